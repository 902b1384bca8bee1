//! The workloads' X.509-SVIDs: one per registered SPIFFE ID, made on this host (the key never
//! leaves the agent but to the attested caller), obtained from the CA with the agent's own SVID
//! (delegated issuance: the CA's `[[agent]]` registration must allow the ID), eagerly at start,
//! and renewed by the same rotation task as every other identity ([`crate::svid::rotation_loop`]:
//! 50 % ±10 % of the remaining lifetime, back-off on failure, withdrawal at expiry).
//!
//! Every renewal is a new delegated issuance with the agent's SVID, never a renewal with the
//! workload's own: so an agent the CA revoked (or whose registration was removed) obtains
//! nothing more, and what it holds is served until it expires, then withdrawn.
//!
//! A workload SVID whose serial appears on the CA's revocation list (refreshed by the agent's
//! identity task) is no longer served, and a new one is asked for at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::identity::{Serial, SpiffeId, Svid};
use crate::svid::ca_client::CaClient;
use crate::svid::{rotation_loop, Error, Identity, Jitter, Obtain};

/// The SVIDs the agent holds for its workloads, and a signal for anything that changes what a
/// caller would be sent (a rotation, a withdrawal, a new bundle).
pub struct Workloads {
    /// In the order of first appearance in the config.
    svids: Vec<Arc<Identity>>,
    changes: watch::Sender<u64>,
}

/// Obtains one workload ID's SVID with the agent's.
#[derive(Clone)]
struct Delegated {
    client: CaClient,
    agent: Arc<Identity>,
    id: SpiffeId,
}

impl Obtain for Delegated {
    async fn obtain(&self, _current: Option<Arc<Svid>>) -> Result<Svid, Error> {
        let agent = self
            .agent
            .current()
            .filter(|s| s.info.not_after > self.agent.clock().now())
            .ok_or(Error::NoAgentSvid("not obtained yet, or expired"))?;
        Ok(self.client.issue_for(&agent, &self.id).await?)
    }
}

impl Workloads {
    /// Starts a rotation task per ID in `ids` (after the agent's first SVID) and the change
    /// signal; everything ends when `shutdown` changes.
    pub fn start(
        ids: &[SpiffeId],
        agent: &Arc<Identity>,
        client: CaClient,
        jitter: Jitter,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let (changes, _) = watch::channel(0);
        let mut svids = Vec::with_capacity(ids.len());
        for id in ids {
            let identity = Identity::sharing(id.clone(), agent);
            let steps = Delegated {
                client: client.clone(),
                agent: agent.clone(),
                id: id.clone(),
            };
            let (a, i, stop) = (agent.clone(), identity.clone(), shutdown.clone());
            let span = tracing::info_span!("workload", id = %id);
            tokio::spawn(
                async move {
                    if wait_for_svid(&a, stop.clone()).await {
                        renew_until_stop(i, &a, steps, jitter, stop).await;
                    }
                }
                .instrument(span),
            );
            forward(identity.rotations(), changes.clone(), shutdown.clone());
            svids.push(identity);
        }
        forward(agent.bundle_updates(), changes.clone(), shutdown.clone());
        // A revoked serial is no longer served (see `Workloads::servable`).
        forward(agent.revocations(), changes.clone(), shutdown);
        Arc::new(Workloads { svids, changes })
    }

    /// The identity of `id`, if registered.
    pub fn get(&self, id: &SpiffeId) -> Option<&Arc<Identity>> {
        self.svids.iter().find(|i| i.id() == id)
    }

    /// Every workload identity, in config order.
    pub fn all(&self) -> &[Arc<Identity>] {
        &self.svids
    }

    /// The SVID of `id` that may be handed out at `now`: held, not expired, not revoked.
    pub fn servable(&self, id: &SpiffeId, now: std::time::SystemTime) -> Option<Arc<Svid>> {
        let identity = self.get(id)?;
        identity
            .current()
            .filter(|s| s.info.not_after > now)
            .filter(|s| !identity.revoked.load().contains(&s.info.serial))
    }

    /// Makes `from`'s changes (a federated bundle, say) changes of what callers are sent.
    pub fn follow(&self, from: watch::Receiver<u64>, shutdown: watch::Receiver<bool>) {
        forward(from, self.changes.clone(), shutdown);
    }

    /// Changes whenever what some caller would be sent changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Runs `identity`'s rotation task; when the CA revokes the SVID it holds (the agent's
/// revocation list names its serial), starts it over at once, so a new SVID is obtained now
/// rather than at the next renewal.
async fn renew_until_stop(
    identity: Arc<Identity>,
    agent: &Identity,
    steps: Delegated,
    jitter: Jitter,
    stop: watch::Receiver<bool>,
) {
    let mut seen: Option<Serial> = None;
    loop {
        tokio::select! {
            () = rotation_loop(identity.clone(), steps.clone(), jitter, stop.clone()) => return,
            serial = revoked(&identity, agent, seen.as_ref()) => {
                tracing::warn!(%serial, "the CA revoked this workload's SVID; obtaining a new one");
                seen = Some(serial);
            }
        }
    }
}

/// Resolves with the serial of the SVID `identity` holds once it is on `agent`'s revocation
/// list (`seen`, already acted on, excepted).
async fn revoked(identity: &Identity, agent: &Identity, seen: Option<&Serial>) -> Serial {
    let mut changes = agent.revocations();
    loop {
        if let Some(s) = identity.current().filter(|s| {
            Some(&s.info.serial) != seen && agent.revoked.load().contains(&s.info.serial)
        }) {
            return s.info.serial.clone();
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Bumps `to` on every change of `from`, until `shutdown`.
fn forward(
    mut from: watch::Receiver<u64>,
    to: watch::Sender<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = from.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            to.send_modify(|n| *n += 1);
        }
    });
}

/// Waits until `agent` holds an SVID; false when `shutdown` changed first.
async fn wait_for_svid(agent: &Identity, mut shutdown: watch::Receiver<bool>) -> bool {
    let mut rotations = agent.rotations();
    while agent.current().is_none() {
        tokio::select! {
            r = rotations.changed() => if r.is_err() { return false },
            _ = shutdown.changed() => return false,
        }
    }
    true
}

/// Seconds until `svid` expires at `now` (0 when expired).
pub fn seconds_left(svid: &Svid, now: std::time::SystemTime) -> u64 {
    svid.info
        .not_after
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
