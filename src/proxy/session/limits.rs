//! Bounds of inbound multiplexed sessions: how many one caller (and everyone) may hold, and the
//! churn budget of one session (refused streams, streams the caller resets).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::limits::{Full, Gate, LogEvery, Permit};
use crate::proxy::config::SessionLimits;
use crate::refusal::Refusal;

/// HTTP/2 header block a session stream may send (decoded size): a `CONNECT` needs a few hundred
/// bytes; h2's default of 16 MiB lets HPACK references make one stream cost megabytes.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
/// Resets this side may send for the caller's protocol errors before the session is closed.
pub const MAX_LOCAL_RESETS: usize = 128;
/// A session that ended this many streams is judged on its resets (Envoy's premature-reset
/// check uses the same shape).
const RESET_JUDGED_AFTER: u32 = 100;
/// How often an otherwise silent session is PINGed; a session with a PING unanswered for this
/// long is dead and dropped.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long the preface and settings of a new session may take after its TLS handshake.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session that was told to go away may take to finish.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Admits inbound sessions: at most `max_total`, at most `max_per_caller` per caller ID.
pub struct SessionGate {
    gate: Gate<String>,
    log: LogEvery,
}

impl SessionGate {
    pub fn new(limits: &SessionLimits) -> Self {
        SessionGate {
            gate: Gate::new(limits.max_total, limits.max_per_caller),
            log: LogEvery::new(Duration::from_secs(1)),
        }
    }

    /// A place for a session of `caller`, or the reason it was refused (logged here, at
    /// most once a second with the number held back).
    pub fn enter(&self, caller: &crate::identity::SpiffeId) -> Result<Permit<String>, Refusal> {
        self.gate.enter(caller.to_string()).map_err(|full| {
            let reason = match full {
                Full::Total => Refusal::SessionCapTotal,
                Full::PerKey => Refusal::SessionCapCaller,
            };
            if let Some(held_back) = self.log.allow() {
                tracing::warn!(reason = reason.label(), peer_id = %caller, held_back, "inbound session refused: too many open sessions");
            }
            reason
        })
    }
}

/// The keep-alive of a session: a PING every [`KEEPALIVE`]; the peer is dead when one is still
/// unanswered at the next.
pub struct KeepAlive {
    pings: Option<h2::PingPong>,
    out: bool,
    timer: tokio::time::Interval,
}

impl KeepAlive {
    pub fn new(pings: Option<h2::PingPong>) -> Self {
        let first = tokio::time::Instant::now() + KEEPALIVE;
        KeepAlive {
            pings,
            out: false,
            timer: tokio::time::interval_at(first, KEEPALIVE),
        }
    }

    /// Resolves once the peer left a PING unanswered for [`KEEPALIVE`]. Cancel-safe: the state
    /// lives in `self`, so it can be polled anew in every round of a `select!`.
    pub async fn dead(&mut self) {
        let Some(pings) = self.pings.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            if self.out {
                tokio::select! {
                    r = std::future::poll_fn(|cx| pings.poll_pong(cx)) => {
                        self.out = false;
                        if r.is_err() {
                            // The connection is ending; its own error ends the session.
                            return std::future::pending().await;
                        }
                    }
                    _ = self.timer.tick() => return,
                }
            } else {
                self.timer.tick().await;
                self.out = pings.send_ping(h2::Ping::opaque()).is_ok();
            }
        }
    }
}

/// What one session has done so far, for its churn budget.
#[derive(Default)]
pub struct SessionCounts {
    /// Streams that ended.
    pub ended: AtomicU32,
    /// Streams refused by policy or because the session's certificate no longer passes.
    pub denied: AtomicU32,
    /// Streams the caller reset (counted by the stream, see `H2Stream::count_resets`).
    pub resets: Arc<AtomicU32>,
}

impl SessionCounts {
    /// Why the session must end now, if it must: too many refused streams, or most of its
    /// streams reset by the caller (a rapid-reset flood costs an app connection per stream).
    pub fn over_budget(&self, limits: &SessionLimits) -> Option<Refusal> {
        if self.denied.load(Ordering::Relaxed) >= limits.max_denied_streams {
            return Some(Refusal::SessionDeniedBudget);
        }
        let ended = self.ended.load(Ordering::Relaxed);
        let resets = self.resets.load(Ordering::Relaxed);
        if ended >= RESET_JUDGED_AFTER && resets.saturating_mul(2) > ended {
            return Some(Refusal::SessionResetFlood);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_over_budget_on_denials_or_mostly_resets() {
        let limits = SessionLimits::default();
        let c = SessionCounts::default();
        assert_eq!(c.over_budget(&limits), None);
        c.ended.store(1000, Ordering::Relaxed);
        c.resets.store(400, Ordering::Relaxed);
        assert_eq!(c.over_budget(&limits), None, "40 % resets is within budget");
        c.resets.store(600, Ordering::Relaxed);
        assert_eq!(c.over_budget(&limits), Some(Refusal::SessionResetFlood));
        let c = SessionCounts::default();
        c.ended.store(10, Ordering::Relaxed);
        c.resets.store(10, Ordering::Relaxed);
        assert_eq!(c.over_budget(&limits), None, "too few streams to judge");
        c.denied.store(limits.max_denied_streams, Ordering::Relaxed);
        assert_eq!(c.over_budget(&limits), Some(Refusal::SessionDeniedBudget));
    }
}
