//! What runs an established session: its connection until it ends, the destination's
//! certificate lapses, or (in our region) it goes unused for the idle timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::renew::{Renewer, Term};
use super::{millis_since, Entry};
use crate::refusal::Refusal;
use crate::region::ServiceName;
use crate::svid::Identity;

/// Runs one session's connection until it ends, the destination's certificate lapses, or (in
/// our region) it has gone unused for the idle timeout; then retires it.
pub(super) struct Driver {
    pub entry: Arc<Entry>,
    pub generation: u64,
    pub service: ServiceName,
    pub idle: Option<Duration>,
    pub started: tokio::time::Instant,
    pub lapse: PeerLapse,
    /// Re-authenticates the session before a certificate lapses (`None`: it cannot).
    pub renewer: Option<Renewer>,
}

impl Driver {
    pub async fn run<F>(self, conn: F)
    where
        F: std::future::Future<Output = Result<(), h2::Error>>,
    {
        let Driver {
            entry,
            generation,
            service,
            idle,
            started,
            lapse,
            renewer,
        } = self;
        tokio::pin!(conn);
        let lapsed = lapse.wait();
        tokio::pin!(lapsed);
        // Polled here with the connection, so its requests make progress.
        let mut renewing = renewer.is_some();
        let renew = async move {
            if let Some(r) = renewer {
                r.run().await;
            }
        };
        tokio::pin!(renew);
        // Until the session is retired for idleness: the check's timer and the idle time.
        let mut idle_check = idle.map(|d| (tokio::time::interval(d / 4), d.as_millis() as u64));
        loop {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, %service, "session ended");
                    }
                    break;
                }
                _ = &mut renew, if renewing => renewing = false,
                reason = &mut lapsed => {
                    // Dropping the connection ends every stream on it, not only new ones.
                    tracing::warn!(reason = reason.label(), %service, "session closed with its open streams: the destination's certificate no longer passes");
                    break;
                }
                Some(idle_ms) = async {
                    let (timer, idle_ms) = idle_check.as_mut()?;
                    timer.tick().await;
                    Some(*idle_ms)
                }, if idle_check.is_some() => {
                    let unused = millis_since(started)
                        .saturating_sub(entry.last_used.load(Ordering::Relaxed));
                    if unused >= idle_ms {
                        // No new stream will use it: once its open streams end, it closes.
                        entry.retire(generation);
                        idle_check = None;
                        tracing::debug!(%service, "idle session closing");
                    }
                }
            }
        }
        entry.retire(generation);
        entry.ended.notify_waiters();
    }
}

/// What ends a session whatever its streams: the destination's certificate revoked (seen on
/// our revocation list) or expired. The certificate is the handshake's until the destination
/// proves a newer one ([`Renewer`] moves `term`).
pub(super) struct PeerLapse {
    pub identity: Arc<Identity>,
    pub revocations: tokio::sync::watch::Receiver<u64>,
    pub term: tokio::sync::watch::Receiver<Term>,
    pub closed: Arc<AtomicU64>,
}

impl PeerLapse {
    /// Waits until the certificate lapses; the reason.
    async fn wait(mut self) -> Refusal {
        let mut renewable = true;
        let reason = loop {
            let Term { serial, expires } = self.term.borrow_and_update().clone();
            if self.identity.revoked.load().contains(&serial) {
                break Refusal::Revoked;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(expires) => break Refusal::ExpiredCertificate,
                r = self.revocations.changed() => {
                    if r.is_err() {
                        // The identity is gone (shutting down): expiry still holds.
                        tokio::time::sleep_until(expires).await;
                        break Refusal::ExpiredCertificate;
                    }
                }
                r = self.term.changed(), if renewable => {
                    // No more re-authentication: the last certificate proved stands.
                    renewable = r.is_ok();
                }
            }
        };
        self.closed.fetch_add(1, Ordering::Relaxed);
        reason
    }
}
