//! The workloads' X.509-SVIDs: one per registered SPIFFE ID, made on this host (the key never
//! leaves the agent but to the attested caller), obtained from the CA with the agent's own SVID
//! (delegated issuance: the CA's `[[agent]]` registration must allow the ID), eagerly at start,
//! and renewed by the same rotation task as every other identity ([`crate::svid::rotation_loop`]:
//! 50 % ±10 % of the remaining lifetime, back-off on failure, withdrawal at expiry).
//!
//! Every renewal is a new delegated issuance with the agent's SVID, never a renewal with the
//! workload's own: so an agent the CA revoked (or whose registration was removed) obtains
//! nothing more, and what it holds is served until it expires, then withdrawn.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::identity::{SpiffeId, Svid};
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
                        rotation_loop(i, steps, jitter, stop).await;
                    }
                }
                .instrument(span),
            );
            forward(identity.rotations(), changes.clone(), shutdown.clone());
            svids.push(identity);
        }
        forward(agent.bundle_updates(), changes.clone(), shutdown);
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

    /// Changes whenever what some caller would be sent changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
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
