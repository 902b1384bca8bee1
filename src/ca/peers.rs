//! Revocation across regions: each regional CA pulls the other regions' CAs' own revocations
//! (`GET /v1/revoked?scope=local`) and serves the union in its `/v1/revoked`, so the sidecars
//! and gateways of every region, which read only their own CA, refuse a serial revoked in any
//! region within one pull plus one of their refreshes.
//!
//! Why CAs pull each other rather than sidecars fetching every region: sidecars keep one CA
//! URL and need no change; a peer CA's reachability is the CA's business (one connection per
//! peer per interval, not one per sidecar); and the CA already verifies peers like any client
//! does. Only a peer's *own* entries are pulled (`scope=local`), so an entry cannot echo
//! between CAs after its origin dropped it (a lifted ban would otherwise live forever).
//!
//! A peer's ban of a SPIFFE ID is honoured here while it stands: no issuance or renewal for it,
//! and this CA's own live SVIDs of it are published as revoked.
//!
//! A peer's certificate must chain to our bundle and name `spiffe://TD/trustline/ca`, and be
//! issued by the CA of the region the peer entry names (`REGION=https://...`), or else by any
//! CA but our own region's: every regional CA's server certificate names the same ID, and one
//! issued by our own region's CA is ourselves or someone holding our key. A peer
//! that is down keeps its last good list (its serials until they expire, its bans until it
//! answers again); every fetch has a timeout and a size and entry cap, and runs in its own
//! task, so a slow peer delays neither serving nor the other peers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::api::CaState;
use super::config::{PeerSpec, MAX_SVID_TTL};
use super::error::PeerConfigError;
pub use super::error::PeerError;
use super::ledger::LedgerError;
use super::tasks::Tasks;
use crate::clock::Clock;
use crate::identity::{parse_id, Serial};
use crate::region::Region;
use crate::svid::ca_client::{CaClient, CaRegion};

/// Longest one fetch of a peer's list may take (connect, TLS, answer).
pub const PEER_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest list body accepted from a peer.
pub const MAX_PEER_BODY: usize = 16 * 1024 * 1024;
/// Most revoked serials accepted from one peer.
pub const MAX_PEER_SERIALS: usize = 100_000;
/// Most banned SPIFFE IDs accepted from one peer.
pub const MAX_PEER_BANS: usize = 10_000;
/// Most peers one CA follows.
pub const MAX_PEERS: usize = 64;

/// What this CA last learned from one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerList {
    /// The peer's own revocation sequence number.
    pub sequence: u64,
    /// When the last good list arrived (Unix seconds); `None` before the first.
    pub fetched_at: Option<u64>,
    /// Its revoked serials and their not_after, unexpired.
    pub revoked: Vec<(Serial, u64)>,
    /// Its banned SPIFFE IDs and since when.
    pub banned: Vec<(String, u64)>,
    /// Why the last fetch failed, if it did.
    pub error: Option<String>,
    /// The region of the CA that issued the peer's certificate at the last good fetch.
    pub region: Option<Region>,
    /// The peer's own JWT-SVID keys (from `GET /v1/bundle?scope=local`), each labelled with
    /// `region`, the verified one, whatever the document says.
    pub jwt_keys: Vec<crate::jwt::PublicKey>,
    /// Why the last fetch of its JWT keys failed (the last good ones are kept).
    pub jwt_error: Option<String>,
}

/// The published revocation view: this CA's own and its peers' entries.
pub struct Union {
    pub revoked: Vec<(Serial, u64)>,
    pub banned: Vec<(String, u64)>,
}

/// The peers this CA follows and what it learned from each.
#[derive(Default)]
pub struct Peers {
    lists: RwLock<BTreeMap<String, PeerList>>,
    /// Every ID some peer bans, for the check on each SVID request.
    banned: RwLock<HashSet<String>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Moves whenever what [`Peers::union`] gives may have changed (the published list's cache).
    generation: AtomicU64,
}

#[derive(Deserialize)]
struct ListDoc {
    sequence: u64,
    revoked: Vec<EntryDoc>,
    #[serde(default)]
    spiffe_ids: Vec<BanDoc>,
}

#[derive(Deserialize)]
struct EntryDoc {
    serial: String,
    not_after: u64,
}

#[derive(Deserialize)]
struct BanDoc {
    spiffe_id: String,
    since: u64,
}

/// Parses a peer's `/v1/revoked` answer, keeping entries unexpired at `now`. A not_after
/// further out than any SVID can live is cut to that, so the entry still goes away.
pub fn parse_list(body: &[u8], now: u64) -> Result<PeerList, PeerError> {
    let doc: ListDoc = serde_json::from_slice(body)?;
    let cap = |what, count, cap| {
        if count > cap {
            Err(PeerError::TooMany { what, count, cap })
        } else {
            Ok(())
        }
    };
    cap("revoked serials", doc.revoked.len(), MAX_PEER_SERIALS)?;
    cap("banned SPIFFE IDs", doc.spiffe_ids.len(), MAX_PEER_BANS)?;
    let latest = now + MAX_SVID_TTL.as_secs();
    let mut revoked = Vec::with_capacity(doc.revoked.len());
    for e in doc.revoked {
        let serial = Serial::parse_hex(&e.serial).ok_or(PeerError::Entry(e.serial))?;
        if e.not_after > now {
            revoked.push((serial, e.not_after.min(latest)));
        }
    }
    let mut banned = Vec::with_capacity(doc.spiffe_ids.len());
    for b in doc.spiffe_ids {
        let id = parse_id(&b.spiffe_id).map_err(|_| PeerError::Entry(b.spiffe_id))?;
        // trustline's own roles (gateways, CAs) are never cut off from another region: a ban
        // of gateway/b published by CA a would stop region b's own gateway from renewing. A
        // peer can still revoke such a certificate by serial.
        if id.path().starts_with(crate::identity::ids::RESERVED_PREFIX) {
            continue;
        }
        banned.push((id.to_string(), b.since));
    }
    Ok(PeerList {
        sequence: doc.sequence,
        fetched_at: Some(now),
        revoked,
        banned,
        error: None,
        region: None,
        jwt_keys: Vec::new(),
        jwt_error: None,
    })
}

/// Most JWT keys taken from one peer (its current and next key, with room to spare).
pub const MAX_PEER_JWT_KEYS: usize = 16;

/// A peer's JWT keys from its `GET /v1/bundle?scope=local` document, labelled with `region`,
/// the region of the CA that issued the peer's certificate (verified in the handshake).
pub fn parse_jwt_keys(
    td: &crate::identity::TrustDomain,
    body: &[u8],
    region: Option<&Region>,
) -> Result<Vec<crate::jwt::PublicKey>, String> {
    let doc = crate::jwt::parse_spiffe_bundle(td, body).map_err(|e| e.to_string())?;
    if doc.jwt.len() > MAX_PEER_JWT_KEYS {
        return Err(format!(
            "{} JWT keys; at most {MAX_PEER_JWT_KEYS} are taken from a peer",
            doc.jwt.len()
        ));
    }
    // A kid is the key's own thumbprint (as ours are): a peer cannot take another key's kid
    // (ours, or another region's) and so shadow it in the documents we publish.
    if let Some(k) = doc.jwt.keys().find(|k| k.kid() != k.thumbprint()) {
        return Err(format!(
            "JWT key {:?}: its kid is not its RFC 7638 thumbprint {:?}",
            k.kid(),
            k.thumbprint()
        ));
    }
    Ok(doc
        .jwt
        .keys()
        .map(|k| k.clone().with_region(region.cloned()))
        .collect())
}

impl Peers {
    /// Whether any peer follows (the published list is then a union).
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, PeerList>> {
        self.lists.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Each peer's URL and state, for the published list and for tests.
    pub fn status(&self) -> Vec<(String, PeerList)> {
        self.read()
            .iter()
            .map(|(u, l)| (u.clone(), l.clone()))
            .collect()
    }

    /// A number that moves whenever a peer's entries change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Each peer's state for operators (the metrics listener's `/peers`): URL, region, when
    /// its list last arrived, how many entries, and why the last fetch failed.
    pub fn status_json(&self) -> serde_json::Value {
        let peers: Vec<_> = self
            .read()
            .iter()
            .map(|(url, p)| {
                serde_json::json!({"url": url, "region": p.region, "sequence": p.sequence,
                    "fetched_at": p.fetched_at, "revoked": p.revoked.len(),
                    "spiffe_ids": p.banned.len(), "error": p.error,
                    "jwt_keys": p.jwt_keys.iter().map(|k| k.kid()).collect::<Vec<_>>(),
                    "jwt_error": p.jwt_error})
            })
            .collect();
        serde_json::json!({ "peers": peers })
    }

    /// The IDs the peer at `url` banned at its last good list.
    fn banned_by(&self, url: &str) -> HashSet<String> {
        self.read()
            .get(url)
            .map(|l| l.banned.iter().map(|(id, _)| id.clone()).collect())
            .unwrap_or_default()
    }

    /// Every peer's JWT keys (its last good ones), for the published bundle.
    pub fn jwt_keys(&self) -> Vec<crate::jwt::PublicKey> {
        self.read()
            .values()
            .flat_map(|l| l.jwt_keys.iter().cloned())
            .collect()
    }

    /// Whether a peer bans `spiffe_id`.
    pub fn bans(&self, spiffe_id: &str) -> bool {
        self.banned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(spiffe_id)
    }

    /// Recomputes [`Peers::bans`]' set after `lists` changed.
    fn index_bans(&self, lists: &BTreeMap<String, PeerList>) {
        let all = lists
            .values()
            .flat_map(|l| l.banned.iter().map(|(id, _)| id.clone()))
            .collect();
        *self.banned.write().unwrap_or_else(|e| e.into_inner()) = all;
    }

    /// This CA's own entries merged with every peer's unexpired ones, sorted, each once.
    pub fn union(&self, local: Vec<(Serial, u64)>, bans: Vec<(String, u64)>, now: u64) -> Union {
        let lists = self.read();
        if lists.is_empty() {
            return Union {
                revoked: local,
                banned: bans,
            };
        }
        let mut revoked: BTreeMap<Serial, u64> = local.into_iter().collect();
        let mut banned: BTreeMap<String, u64> = bans.into_iter().collect();
        for l in lists.values() {
            for (s, na) in l.revoked.iter().filter(|(_, na)| *na > now) {
                let e = revoked.entry(s.clone()).or_insert(*na);
                *e = (*e).max(*na);
            }
            for (id, since) in &l.banned {
                banned.entry(id.clone()).or_insert(*since);
            }
        }
        Union {
            revoked: revoked.into_iter().collect(),
            banned: banned.into_iter().collect(),
        }
    }

    /// Takes one fetch's outcome for `url`: a good list replaces the last one; a failure keeps
    /// it (minus what expired) and says why.
    fn record(&self, url: &str, outcome: Result<PeerList, PeerError>, now: u64) {
        let mut lists = self.lists.write().unwrap_or_else(|e| e.into_inner());
        let Some(cur) = lists.get_mut(url) else {
            return; // no longer followed
        };
        match outcome {
            Ok(list) => {
                if cur.error.is_some() {
                    tracing::info!(
                        peer = url,
                        revoked = list.revoked.len(),
                        "peer CA's revocation list is fetched again"
                    );
                }
                let mut list = list;
                if let Some(e) = &list.jwt_error {
                    if cur.jwt_error.is_none() {
                        tracing::warn!(peer = url, error = %e, "fetching a peer CA's JWT keys failed; keeping its last good ones");
                    }
                    list.jwt_keys = std::mem::take(&mut cur.jwt_keys);
                }
                let same = cur.revoked == list.revoked
                    && cur.banned == list.banned
                    && cur.jwt_keys == list.jwt_keys;
                *cur = list;
                if !same {
                    self.index_bans(&lists);
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
            }
            Err(e) => {
                if cur.error.is_none() {
                    tracing::warn!(peer = url, error = %e, last_good = ?cur.fetched_at, "fetching a peer CA's revocation list failed; keeping its last good list");
                } else {
                    tracing::debug!(peer = url, error = %e, "peer CA's revocation list still unavailable");
                }
                cur.error = Some(e.to_string());
                cur.revoked.retain(|(_, na)| *na > now);
            }
        }
    }

    /// Follows exactly `clients` from now on (by URL), each pulled every `every` until
    /// `shutdown`. A peer followed before keeps its last list; one no longer named is dropped.
    pub(super) fn follow(
        state: &Arc<CaState>,
        clients: Vec<(String, CaClient)>,
        every: Duration,
        spawn: &Tasks,
    ) {
        let this = &state.peers;
        let mut tasks = this.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
        {
            let mut lists = this.lists.write().unwrap_or_else(|e| e.into_inner());
            let old = std::mem::take(&mut *lists);
            let mut old: HashMap<_, _> = old.into_iter().collect();
            for (url, _) in &clients {
                lists.insert(url.clone(), old.remove(url).unwrap_or_default());
            }
            this.index_bans(&lists);
            this.generation.fetch_add(1, Ordering::AcqRel);
        }
        for (url, client) in clients {
            let state = state.clone();
            let shutdown = spawn.shutdown.clone();
            let span = tracing::info_span!("peer_ca", peer = %url);
            tasks.push(spawn.spawn(tracing::Instrument::instrument(
                async move { pull_loop(state, url, client, every, shutdown).await },
                span,
            )));
        }
    }
}

async fn pull_loop(
    state: Arc<CaState>,
    url: String,
    client: CaClient,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let td = &state.authority.trust_domain;
        let fetched =
            tokio::time::timeout(PEER_FETCH_TIMEOUT, fetch(&client, &state.clock, td)).await;
        let outcome = match fetched {
            Ok(Ok(list)) => revoke_local_of_banned(&state, &url, &list)
                .await
                .map(|()| list),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PeerError::Timeout(PEER_FETCH_TIMEOUT)),
        };
        let labels = super::metrics::PeerLabels { peer: url.clone() };
        match &outcome {
            Ok(_) => {
                let now = state.clock.unix() as i64;
                state.metrics.peer_fetched.get_or_create(&labels).set(now);
            }
            Err(_) => {
                state.metrics.peer_failures.get_or_create(&labels).inc();
            }
        }
        state.peers.record(&url, outcome, state.clock.unix());
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn fetch(
    client: &CaClient,
    clock: &Clock,
    td: &crate::identity::TrustDomain,
) -> Result<PeerList, PeerError> {
    let (body, region) = client
        .get_limited_from("/v1/revoked?scope=local", MAX_PEER_BODY)
        .await?;
    let mut list = parse_list(&body, clock.unix())?;
    // The JWT keys ride along; a peer that cannot give them still gives its revocations.
    let keys = match client
        .get_limited_from("/v1/bundle?scope=local", MAX_PEER_BODY)
        .await
    {
        // Labelled with the region of the certificate this answer came over.
        Ok((body, r)) => parse_jwt_keys(td, &body, r.as_ref()),
        Err(e) => Err(e.to_string()),
    };
    match keys {
        Ok(k) => list.jwt_keys = k,
        Err(e) => list.jwt_error = Some(e),
    }
    list.region = region;
    Ok(list)
}

/// Revokes, in this CA's ledger, its live serials of each ID the peer newly bans (no new ones
/// can appear: issuance for a peer-banned ID is refused), so a cut-off identity is refused in
/// every region, and a lifted ban allows new issuance only: a stolen SVID does not come back.
/// A failure leaves the list untaken, so the next pull tries again.
async fn revoke_local_of_banned(
    state: &CaState,
    url: &str,
    list: &PeerList,
) -> Result<(), PeerError> {
    let now = list.fetched_at.unwrap_or_default();
    let known = state.peers.banned_by(url);
    for (id, _) in list.banned.iter().filter(|(id, _)| !known.contains(id)) {
        let failed = |error| PeerError::Ledger {
            id: id.clone(),
            error,
        };
        for (serial, _) in state.ledger.live_serials(id, now).await.map_err(failed)? {
            if state.ledger.is_revoked(&serial) {
                continue;
            }
            match state.ledger.revoke(serial.clone(), now).await {
                Ok(r) => {
                    tracing::warn!(peer = url, spiffe_id = %id, %serial, revoked = r.serials.len(),
                        "revoked this CA's SVID of an ID a peer CA bans");
                }
                Err(LedgerError::AlreadyRevoked(_)) => {}
                Err(e) => return Err(failed(e)),
            }
        }
    }
    Ok(())
}

/// A client for each peer, verifying it as `spiffe://TD/trustline/ca` against `trust` (the
/// CA's published roots, as they are at each pull: a root added by a rotation counts), issued
/// by the region's CA the entry names, or else by any CA but `own_region`'s (this CA's). A peer
/// naming our own region is refused.
pub fn clients(
    peers: &[PeerSpec],
    trust: &std::sync::Arc<crate::tls::mesh::Trust>,
    clock: &Clock,
    own_region: Option<&Region>,
) -> Result<Vec<(String, CaClient)>, PeerConfigError> {
    peers
        .iter()
        .map(|p| {
            let rule = match (&p.region, own_region) {
                (Some(r), Some(own)) if r == own => {
                    return Err(PeerConfigError::OwnRegion {
                        url: p.url.clone(),
                        region: r.clone(),
                    })
                }
                (Some(r), _) => CaRegion::Is(r.clone()),
                (None, Some(own)) => CaRegion::Not(own.clone()),
                (None, None) => CaRegion::Any,
            };
            let client = CaClient::new(&p.url, (*trust.bundle()).clone(), clock.clone())?
                .with_region(rule)
                .with_trust(trust.clone());
            Ok((p.url.clone(), client))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_jwt_keys_take_the_verified_region_whatever_its_document_says() {
        let td = crate::identity::parse_trust_domain("x.test").unwrap();
        let r = |n: &str| Region::new(n).unwrap();
        let key = crate::jwt::SigningKey::generate().unwrap();
        // The peer's document says its key is region b's; its certificate was issued by c's CA.
        let doc = crate::jwt::spiffe_bundle_json(&[], &[key.public(Some(r("b")))], 1, 300);
        let keys = parse_jwt_keys(&td, doc.to_string().as_bytes(), Some(&r("c"))).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid(), key.kid());
        assert_eq!(keys[0].region(), Some(&r("c")));
        // A root CA peer (no region) gives keys of no region: its tokens never match `regions`.
        let keys = parse_jwt_keys(&td, doc.to_string().as_bytes(), None).unwrap();
        assert_eq!(keys[0].region(), None);
        // A key under another key's kid (ours, say) is refused.
        let mut jwk = key.public(None).to_jwk();
        jwk["kid"] = serde_json::json!(crate::jwt::SigningKey::generate().unwrap().kid());
        let forged = crate::jwt::PublicKey::from_jwk(&jwk).unwrap();
        let doc = crate::jwt::spiffe_bundle_json(&[], &[forged], 1, 300);
        let e = parse_jwt_keys(&td, doc.to_string().as_bytes(), Some(&r("c"))).unwrap_err();
        assert!(e.contains("thumbprint"), "{e}");
        // A peer cannot flood the published bundle with keys.
        let many: Vec<_> = (0..=MAX_PEER_JWT_KEYS)
            .map(|_| crate::jwt::SigningKey::generate().unwrap().public(None))
            .collect();
        let doc = crate::jwt::spiffe_bundle_json(&[], &many, 1, 300);
        let e = parse_jwt_keys(&td, doc.to_string().as_bytes(), Some(&r("c"))).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn a_peer_list_keeps_unexpired_entries_and_caps_far_expiries() {
        let body = br#"{"sequence":7,"revoked":[{"serial":"0a","not_after":50},{"serial":"0b","not_after":200},{"serial":"0c","not_after":18446744073709551615}],"spiffe_ids":[{"spiffe_id":"spiffe://td/ns/x/sa/y","since":3}]}"#;
        let l = parse_list(body, 100).unwrap();
        assert_eq!(l.sequence, 7);
        assert_eq!(l.revoked.len(), 2);
        assert_eq!(l.revoked[0], (Serial::parse_hex("0b").unwrap(), 200));
        assert_eq!(l.revoked[1].1, 100 + MAX_SVID_TTL.as_secs());
        assert_eq!(l.banned, vec![("spiffe://td/ns/x/sa/y".to_string(), 3)]);
    }

    #[test]
    fn a_peer_cannot_ban_trustlines_own_roles() {
        let body = br#"{"sequence":1,"revoked":[],"spiffe_ids":[{"spiffe_id":"spiffe://td/trustline/gateway/b","since":3},{"spiffe_id":"spiffe://td/trustline/ca","since":3},{"spiffe_id":"spiffe://td/ns/x/sa/y","since":3}]}"#;
        let l = parse_list(body, 100).unwrap();
        assert_eq!(l.banned, vec![("spiffe://td/ns/x/sa/y".to_string(), 3)]);
    }

    #[test]
    fn a_bad_peer_list_is_refused_with_what_is_wrong() {
        let e = parse_list(
            br#"{"sequence":1,"revoked":[{"serial":"zz","not_after":5}]}"#,
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("zz"), "{e}");
        assert!(parse_list(b"[]", 1).is_err());
        // An old CA without `spiffe_ids` is still understood.
        assert!(parse_list(br#"{"sequence":0,"revoked":[]}"#, 1).is_ok());
    }

    #[test]
    fn a_failed_fetch_keeps_the_last_good_list_until_it_expires() {
        let peers = Peers::default();
        peers
            .lists
            .write()
            .unwrap()
            .insert("p".into(), PeerList::default());
        let good = parse_list(
            br#"{"sequence":1,"revoked":[{"serial":"01","not_after":10},{"serial":"02","not_after":99}]}"#,
            1,
        )
        .unwrap();
        peers.record("p", Ok(good), 1);
        peers.record("p", Err(PeerError::Timeout(PEER_FETCH_TIMEOUT)), 20);
        let u = peers.union(vec![], vec![], 20);
        assert_eq!(u.revoked, vec![(Serial::parse_hex("02").unwrap(), 99)]);
        assert!(peers.status()[0].1.error.is_some());
    }

    #[test]
    fn the_generation_moves_only_when_a_peers_entries_change() {
        let peers = Peers::default();
        peers
            .lists
            .write()
            .unwrap()
            .insert("p".into(), PeerList::default());
        let list = |body: &[u8], now| parse_list(body, now).unwrap();
        let one = br#"{"sequence":1,"revoked":[{"serial":"01","not_after":99}]}"#;
        let g = peers.generation();
        peers.record("p", Ok(list(one, 1)), 1);
        assert_eq!(peers.generation(), g + 1);
        // The same entries fetched again (a later fetched_at) do not invalidate the cache.
        peers.record("p", Ok(list(one, 2)), 2);
        peers.record("p", Err(PeerError::Timeout(PEER_FETCH_TIMEOUT)), 3);
        assert_eq!(peers.generation(), g + 1);
        let two = br#"{"sequence":2,"revoked":[],"spiffe_ids":[{"spiffe_id":"spiffe://td/x","since":3}]}"#;
        peers.record("p", Ok(list(two, 4)), 4);
        assert_eq!(peers.generation(), g + 2);
        assert!(peers.bans("spiffe://td/x"));
    }
}
