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
    manual: Option<Arc<Mutex<SystemTime>>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock that stands still at `start` until [`Clock::advance`] moves it.
    pub fn manual(start: SystemTime) -> Self {
        Self {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        match &self.manual {
            Some(t) => *t.lock().unwrap_or_else(|e| e.into_inner()),
            None => SystemTime::now(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> u64 {
        unix_secs(self.now())
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(t) = &self.manual {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            *t += by;
        }
    }
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
