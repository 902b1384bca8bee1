//! Injected wall-clock time.
//!
//! Certificate validity, token expiry and renewal deadlines are wall-clock facts, which tokio's
//! paused time does not move. Every component that asks "what time is it" takes a [`Clock`], so
//! tests can move time forward without sleeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::UnixTime;

/// A source of wall-clock time: the system clock, or a manual clock for tests.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    source: Source,
}

#[derive(Clone, Debug, Default)]
enum Source {
    #[default]
    System,
    Manual(Arc<Mutex<SystemTime>>),
    /// `start` plus the tokio time elapsed since `since`, plus what [`Clock::advance`] added.
    Tokio {
        start: SystemTime,
        since: tokio::time::Instant,
        added: Arc<Mutex<Duration>>,
    },
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self {
            source: Source::System,
        }
    }

    /// A clock that stands still at `start` until [`Clock::advance`] moves it.
    pub fn manual(start: SystemTime) -> Self {
        Self {
            source: Source::Manual(Arc::new(Mutex::new(start))),
        }
    }

    /// A clock that starts at the system's current time and then moves exactly as tokio's clock
    /// does. On tokio's paused time (`#[tokio::test(start_paused = true)]`, or
    /// `tokio::time::pause`) wall time and timers advance together, so a test of renewal or
    /// expiry runs through hours of certificate lifetime in milliseconds; on a running clock it
    /// follows the monotonic clock. Call it inside the runtime whose time it follows.
    // The OS wall clock is read here and in `now`, nowhere else (clippy.toml).
    #[allow(clippy::disallowed_methods)]
    pub fn following_tokio() -> Self {
        Self {
            source: Source::Tokio {
                start: SystemTime::now(),
                since: tokio::time::Instant::now(),
                added: Arc::default(),
            },
        }
    }

    /// The current time.
    #[allow(clippy::disallowed_methods)]
    pub fn now(&self) -> SystemTime {
        match &self.source {
            Source::System => SystemTime::now(),
            Source::Manual(t) => *lock(t),
            Source::Tokio {
                start,
                since,
                added,
            } => *start + since.elapsed() + *lock(added),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> u64 {
        unix_secs(self.now())
    }

    /// Moves a manual clock forward; on a [`Clock::following_tokio`] clock, steps the wall time
    /// alone (timers do not move: a clock jump); a no-op on the system clock.
    pub fn advance(&self, by: Duration) {
        match &self.source {
            Source::System => {}
            Source::Manual(t) => *lock(t) += by,
            Source::Tokio { added, .. } => *lock(added) += by,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 form of a time, in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl rustls::time_provider::TimeProvider for Clock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(
            self.now().duration_since(UNIX_EPOCH).ok()?,
        ))
    }
}
