//! Live connections, re-checked while they last, not only when they are admitted.
//!
//! Every connection the sidecar carries for a verified peer (inbound L4 and HTTP connections,
//! inbound sessions and each of their streams, outbound connections) is registered here with the
//! facts of the certificate it was authenticated with: serial and `not_after`, and for inbound
//! L4 connections under a policy, the port it was decided on and the policy generation. A
//! [`Sweeper`] re-checks them all:
//!
//! - when the revocation list changes (the identity task announces it),
//! - when the policy is reloaded ([`super::authz::Authz::reload`] sweeps at once),
//! - on a timer: at least every revocation refresh interval, at the earliest `not_after` of a
//!   live connection, and at the next whole minute while a policy with `hours` windows decides
//!   live L4 connections (windows are given to the minute, so that is when they open and close).
//!
//! What no longer passes is closed, audited (one `decision` line with outcome `deny`, the rule,
//! and `live connection closed: REASON` as detail) and counted by the connection itself in
//! `trustline_live_connections_closed_total{direction, reason}`; the reasons are
//! [`CloseReason`]'s. The hot path pays one map insert and one remove per connection, and one
//! small channel; sweeps take the lock once and hand the victims out of it before any I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, watch, Notify};

use super::authz::Authz;
use crate::audit::decision::DecisionEvent;
use crate::audit::AuditLog;
use crate::clock::{rfc3339, Clock};
use crate::identity::CertInfo;
use crate::refusal::Refusal;
use crate::region::Region;
use crate::svid::Identity;

/// Why a sweep closed a live connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer's certificate serial is on the revocation list.
    Revoked,
    /// The peer's certificate reached its `not_after`.
    ExpiredCertificate,
    /// A reloaded policy no longer allows the connection.
    PolicyReload,
    /// The time window of the rule that allowed it has ended.
    TimeWindowClosed,
}

impl CloseReason {
    /// The refusal this close reason is counted and audited as.
    pub fn refusal(self) -> Refusal {
        match self {
            CloseReason::Revoked => Refusal::Revoked,
            CloseReason::ExpiredCertificate => Refusal::ExpiredCertificate,
            CloseReason::PolicyReload => Refusal::PolicyReload,
            CloseReason::TimeWindowClosed => Refusal::TimeWindowClosed,
        }
    }

    /// The metric label and audit word.
    pub fn as_str(self) -> &'static str {
        self.refusal().label()
    }
}

/// A verified peer certificate: its facts and the region of its issuing CA.
pub(crate) struct PeerCert {
    pub info: CertInfo,
    pub region: Option<Region>,
}

/// The certificate a live connection's authentication rests on now: fixed for a TLS
/// connection, replaced for a session (and so for each of its streams) when the peer
/// re-authenticates with a newer SVID ([`crate::proxy::session::reauth`]). Sweeps read it when
/// they run.
pub(crate) type SharedPeer = Arc<ArcSwap<PeerCert>>;

impl PeerCert {
    /// `peer` as a [`SharedPeer`] that nothing replaces.
    pub fn shared(peer: Arc<PeerCert>) -> SharedPeer {
        Arc::new(ArcSwap::new(peer))
    }
}

/// One live connection.
pub(crate) struct Entry {
    pub direction: &'static str,
    pub peer: SharedPeer,
    /// The port the connection was decided on (inbound), or dialled (outbound).
    pub port: u16,
    /// For an inbound L4 connection decided by the policy: re-decided by every sweep.
    pub policy: Option<Decided>,
    close: oneshot::Sender<CloseReason>,
}

/// How the policy last allowed a live L4 connection.
pub(crate) struct Decided {
    /// The policy generation (see [`Authz::generation`]).
    pub generation: u64,
    /// The rule that allowed it.
    pub rule: String,
}

/// A connection taken out of the registry by a sweep, with why.
pub(crate) struct Closed {
    pub entry: Entry,
    pub reason: CloseReason,
    /// The rule that now denies it (policy closures), else the reason.
    pub rule: String,
}

/// The registry of live connections.
pub struct LiveConns {
    map: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    /// The earliest `not_after` of a registered connection, in Unix seconds (`u64::MAX`: none).
    earliest: AtomicU64,
    /// Woken when a connection registers with an earlier `not_after` than the sweeper waits for.
    sooner: Notify,
}

/// The registration of one live connection; dropping it unregisters the connection.
pub(crate) struct Registration {
    live: Arc<LiveConns>,
    id: u64,
    closed: oneshot::Receiver<CloseReason>,
}

impl Registration {
    /// Resolves when a sweep closes the connection (never, if it stays allowed).
    pub async fn closed(&mut self) -> CloseReason {
        match (&mut self.closed).await {
            Ok(r) => r,
            // The registry is gone (the sidecar stops): nothing will close it from here.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

impl Default for LiveConns {
    fn default() -> Self {
        LiveConns {
            map: Mutex::default(),
            next: AtomicU64::new(1),
            earliest: AtomicU64::new(u64::MAX),
            sooner: Notify::new(),
        }
    }
}

impl LiveConns {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a live connection of `peer`.
    pub(crate) fn register(
        self: &Arc<Self>,
        direction: &'static str,
        peer: SharedPeer,
        port: u16,
        policy: Option<Decided>,
    ) -> Registration {
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let expires = secs(peer.load().info.not_after);
        self.lock().insert(
            id,
            Entry {
                direction,
                peer,
                port,
                policy,
                close: tx,
            },
        );
        self.expires_at(expires);
        Registration {
            live: self.clone(),
            id,
            closed: rx,
        }
    }

    /// Tells the sweeper that a registered connection now expires at `not_after` (its
    /// [`SharedPeer`] was replaced). A later expiry needs nothing: the sweep that wakes for the
    /// old one finds the new one and recomputes the earliest.
    pub(crate) fn moved(&self, not_after: SystemTime) {
        self.expires_at(secs(not_after));
    }

    fn expires_at(&self, expires: u64) {
        if expires < self.earliest.fetch_min(expires, Ordering::Relaxed) {
            // The sweeper may be sleeping past this expiry.
            self.sooner.notify_one();
        }
    }

    /// Takes out every connection `verdict` closes; the others stay. Also recomputes the
    /// earliest `not_after` of what stays.
    pub(crate) fn recheck(
        &self,
        mut verdict: impl FnMut(&mut Entry) -> Option<(CloseReason, String)>,
    ) -> Vec<Closed> {
        let mut map = self.lock();
        let doomed: Vec<(u64, CloseReason, String)> = map
            .iter_mut()
            .filter_map(|(id, e)| verdict(e).map(|(r, rule)| (*id, r, rule)))
            .collect();
        let closed = doomed
            .into_iter()
            .filter_map(|(id, reason, rule)| {
                map.remove(&id).map(|entry| Closed {
                    entry,
                    reason,
                    rule,
                })
            })
            .collect();
        let earliest = map
            .values()
            .map(|e| secs(e.peer.load().info.not_after))
            .min()
            .unwrap_or(u64::MAX);
        self.earliest.store(earliest, Ordering::Relaxed);
        closed
    }

    /// Whether a registered inbound connection is decided by the policy.
    fn has_policy_entries(&self) -> bool {
        self.lock().values().any(|e| e.policy.is_some())
    }

    /// When the earliest certificate of a live connection expires, if any is registered.
    fn earliest_expiry(&self) -> Option<SystemTime> {
        match self.earliest.load(Ordering::Relaxed) {
            u64::MAX => None,
            s => Some(UNIX_EPOCH + Duration::from_secs(s)),
        }
    }
}

/// Whole seconds since the epoch, rounded up (a certificate is valid through its `not_after`).
fn secs(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Writes the audit line of a closed connection and tells it to close.
pub(crate) fn close_audited(
    closed: Closed,
    audit: &AuditLog,
    service: &str,
    region: Option<&str>,
    clock: &Clock,
) {
    let Closed {
        entry,
        reason,
        rule,
    } = closed;
    let _ = entry.close.send(reason);
    let peer = entry.peer.load();
    let info = &peer.info;
    tracing::warn!(reason = reason.as_str(), direction = entry.direction, peer_id = %info.id, serial = %info.serial, port = entry.port, %rule, "closing a live connection");
    audit.record(&DecisionEvent {
        time: rfc3339(clock.now()),
        event: "decision",
        source_id: info.id.to_string(),
        source_serial: info.serial.to_string(),
        source_region: peer.region.as_ref().map(Region::to_string),
        destination_service: service.to_string(),
        destination_region: region.map(str::to_string),
        port: entry.port,
        method: None,
        path: None,
        jwt: None,
        outcome: "deny",
        rule,
        mode: "enforced",
        detail: Some(match &entry.policy {
            Some(d) => format!(
                "live {} connection closed: {} (it was allowed by rule {:?})",
                entry.direction,
                reason.as_str(),
                d.rule
            ),
            None => format!(
                "live {} connection closed: {}",
                entry.direction,
                reason.as_str()
            ),
        }),
    });
}

/// Re-checks the live connections of one sidecar (see the module docs).
pub(crate) struct Sweeper {
    pub live: Arc<LiveConns>,
    pub identity: Arc<Identity>,
    pub authz: Option<Arc<Authz>>,
    pub audit: Arc<AuditLog>,
    /// What audit lines name as the destination: the policy's service, else our SPIFFE ID.
    pub service: String,
    pub region: Option<Region>,
    pub clock: Clock,
    /// The revocation refresh interval: the longest the sweeper sleeps.
    pub every: Duration,
}

impl Sweeper {
    /// Sweeps until `stop` changes.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut revocations = self.identity.revocations();
        loop {
            let wait = self.next_wait();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.live.sooner.notified() => continue,
                r = revocations.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            self.sweep();
        }
    }

    /// Until the next timed sweep: the refresh interval, or sooner for an expiry or a minute.
    fn next_wait(&self) -> Duration {
        let now = self.clock.now();
        let mut wait = self.every;
        if let Some(t) = self.live.earliest_expiry() {
            // A little after, so the certificate is expired when we look.
            wait = wait.min(t.duration_since(now).unwrap_or_default() + Duration::from_millis(1));
        }
        let timed = self
            .authz
            .as_ref()
            .is_some_and(|a| a.has_time_windows() && self.live.has_policy_entries());
        if timed {
            let into = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            let to_minute = Duration::from_secs(60 - into.as_secs() % 60)
                - Duration::from_nanos(u64::from(into.subsec_nanos()));
            wait = wait.min(to_minute + Duration::from_millis(1));
        }
        wait.max(Duration::from_millis(1))
    }

    /// One pass: closes what is revoked, expired, or no longer allowed by the policy.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        let revoked = self.identity.revoked.load();
        let closed = self.live.recheck(|e| {
            let peer = e.peer.load();
            let info = &peer.info;
            let lapsed = if revoked.contains(&info.serial) {
                Some(CloseReason::Revoked)
            } else {
                (now >= info.not_after).then_some(CloseReason::ExpiredCertificate)
            };
            if let Some(r) = lapsed {
                // No rule closed it: the audit line names the reason as its rule.
                return Some((r, r.as_str().to_string()));
            }
            let authz = self.authz.as_ref()?;
            authz.recheck(e)
        });
        let n = closed.len();
        for c in closed {
            if c.reason == CloseReason::PolicyReload {
                if let Some(a) = &self.authz {
                    a.metrics.closed_by_reload.inc();
                }
            }
            close_audited(
                c,
                &self.audit,
                &self.service,
                self.region.as_deref(),
                &self.clock,
            );
        }
        n
    }
}
