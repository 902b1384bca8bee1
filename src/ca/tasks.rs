//! The CA server's tasks, counted so a shutdown can wait for them ([`crate::drain::Tracker`]),
//! and the two signals that end them: `shutdown` (stop accepting, finish what is in flight, end
//! the loops) and, at the drain deadline, `cut` (end whatever is still running).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::drain::Tracker;

/// How long cut tasks get to end (they end at their next poll).
const CUT_GRACE: Duration = Duration::from_secs(1);

/// Spawns and counts the CA's tasks; cloned into whatever spawns more.
#[derive(Clone)]
pub struct Tasks {
    tracker: Arc<Tracker>,
    /// Turns true at shutdown.
    pub shutdown: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
}

/// The owner's side: sends the signals and waits.
pub struct Stopper {
    shutdown: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    tasks: Tasks,
}

impl Stopper {
    /// A new set of tasks, none running.
    pub fn new() -> Self {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (cut, cut_rx) = watch::channel(false);
        let tasks = Tasks {
            tracker: Arc::new(Tracker::default()),
            shutdown: shutdown_rx,
            cut: cut_rx,
        };
        Stopper {
            shutdown,
            cut,
            tasks,
        }
    }

    /// The spawning side.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Asks every task to finish (returns at once).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// A receiver of the shutdown signal.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Asks every task to finish, waits for them up to `deadline`, then cuts the rest and
    /// waits for them to go. Returns how many were still running at the deadline.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.shutdown();
        let tracker = &self.tasks.tracker;
        let _ = tokio::time::timeout(deadline, tracker.idle()).await;
        let left = tracker.active();
        if left > 0 {
            let _ = self.cut.send(true);
            let _ = tokio::time::timeout(CUT_GRACE, tracker.idle()).await;
        }
        left
    }

    /// Tasks running now.
    pub fn active(&self) -> usize {
        self.tasks.tracker.active()
    }
}

impl Default for Stopper {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// Spawns `fut`, counted until it ends or is cut.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<()>
    where
        F: Future + Send + 'static,
    {
        let guard = self.tracker.enter();
        let mut cut = self.cut.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = fut => {}
                _ = fired(&mut cut) => {}
            }
        })
    }
}

/// Resolves once `rx` is true; never if its sender is gone without sending it (a dropped
/// server ends its tasks through `shutdown`, as before, not by cutting them).
async fn fired(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Sets its flag when dropped (the task ended or was cut).
    struct Ended(Arc<AtomicBool>);

    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn drain_waits_for_tasks_that_finish_after_shutdown() {
        let stopper = Stopper::new();
        let done = Arc::new(AtomicBool::new(false));
        let mut shutdown = stopper.tasks().shutdown.clone();
        let flag = done.clone();
        stopper.tasks().spawn(async move {
            let _ = shutdown.changed().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        });
        assert_eq!(stopper.active(), 1);
        assert_eq!(stopper.drain(Duration::from_secs(10)).await, 0);
        assert!(done.load(Ordering::SeqCst), "the task finished its work");
        assert_eq!(stopper.active(), 0);
    }

    #[tokio::test]
    async fn drain_cuts_what_still_runs_at_the_deadline() {
        let stopper = Stopper::new();
        let ended = Arc::new(AtomicBool::new(false));
        let guard = Ended(ended.clone());
        stopper.tasks().spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        assert_eq!(stopper.drain(Duration::from_millis(50)).await, 1);
        assert!(ended.load(Ordering::SeqCst), "the task was cut");
        assert_eq!(stopper.active(), 0);
    }

    #[tokio::test]
    async fn a_dropped_stopper_does_not_cut_its_tasks() {
        let stopper = Stopper::new();
        let tasks = stopper.tasks().clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(());
        });
        drop(stopper);
        task.await.unwrap();
        assert!(rx.await.is_ok(), "the task ran to its end");
    }
}
