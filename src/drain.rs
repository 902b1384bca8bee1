//! Draining: a count of live connections that a shutdown can wait on (stop accepting, wait for
//! the count to reach zero or a deadline, then cut what is left).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Counts live connections so a drain can wait for them.
#[derive(Default)]
pub struct Tracker {
    active: AtomicUsize,
    idle: Notify,
}

/// Held by a live connection; dropping it counts the connection out.
pub struct Tracked(Arc<Tracker>);

impl Tracker {
    /// Counts one connection in, until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>) -> Tracked {
        self.active.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    /// Connections in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    /// Resolves once no tracked connection is left (at once if none is).
    pub async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            idle.await;
        }
    }
}
