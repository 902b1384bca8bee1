//! Caps shared by the listeners (the CA API, inbound sessions, gateways): a gate that admits a
//! bounded number of live things in total and per key, a client key that aggregates IPv6 by /64,
//! and a log limiter so that a flood of refusals does not become a flood of log lines.
//!
//! It also raises the process's open-file limit at start ([`raise_nofile_limit`]).
//!
//! Everything here is bounded by construction: a gate's map holds at most `max_total` keys
//! (each key has at least one live permit), and a limiter is two atomics.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Which cap refused an admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The listener's total cap.
    Total,
    /// The cap of one key (a client address, a caller's SPIFFE ID).
    PerKey,
}

/// Admits at most `max_total` live permits, and at most `max_per_key` for any one key.
pub struct Gate<K: Hash + Eq + Clone> {
    inner: Arc<GateInner<K>>,
}

struct GateInner<K> {
    max_total: usize,
    max_per_key: usize,
    state: Mutex<GateState<K>>,
}

struct GateState<K> {
    total: usize,
    per_key: HashMap<K, usize>,
}

/// One admitted thing; dropping it frees its place.
pub struct Permit<K: Hash + Eq + Clone> {
    inner: Arc<GateInner<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Gate<K> {
    /// A gate with both caps; a cap of 0 admits nothing (config validation refuses 0).
    pub fn new(max_total: usize, max_per_key: usize) -> Self {
        Gate {
            inner: Arc::new(GateInner {
                max_total,
                max_per_key,
                state: Mutex::new(GateState {
                    total: 0,
                    per_key: HashMap::new(),
                }),
            }),
        }
    }

    /// Takes a place for `key`, or says which cap is full.
    pub fn enter(&self, key: K) -> Result<Permit<K>, Full> {
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.total >= self.inner.max_total {
            return Err(Full::Total);
        }
        let n = s.per_key.entry(key.clone()).or_insert(0);
        if *n >= self.inner.max_per_key {
            return Err(Full::PerKey);
        }
        *n += 1;
        s.total += 1;
        Ok(Permit {
            inner: self.inner.clone(),
            key,
        })
    }

    /// Live permits in total.
    pub fn total(&self) -> usize {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total
    }
}

impl<K: Hash + Eq + Clone> Drop for Permit<K> {
    fn drop(&mut self) {
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        s.total -= 1;
        if let Some(n) = s.per_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                s.per_key.remove(&self.key);
            }
        }
    }
}

/// The key of a client address for per-client caps: the IPv4 address, or the /64 of an IPv6
/// address (one host or subnet owns a whole /64, so per-address caps would be free to evade).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Lets one log line through per `every`, and counts the ones held back, so a flood of
/// refusals is logged as one line a second saying how many there were.
pub struct LogEvery {
    every_ms: u64,
    started: Instant,
    /// Milliseconds since `started` of the last line let through, plus one (0: never).
    last: AtomicU64,
    held: AtomicU64,
}

impl LogEvery {
    pub fn new(every: Duration) -> Self {
        LogEvery {
            every_ms: every.as_millis() as u64,
            started: Instant::now(),
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.every_ms {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

/// What [`raise_nofile_limit`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit before (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
    /// The hard limit (the ceiling an unprivileged process may raise its soft limit to).
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as Envoy and ztunnel do at start: the
/// soft default (often 1024) would cap a proxy at a few hundred connections, each costing two
/// or more descriptors. Never lowers it; an error leaves the limit as it was.
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let old = getrlimit(Resource::Nofile);
    let raise = match (old.current, old.maximum) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(cur), Some(max)) => cur < max,
    };
    if raise {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: old.maximum,
                maximum: old.maximum,
            },
        )?;
    }
    Ok(NofileLimit {
        before: old.current,
        now: getrlimit(Resource::Nofile).current,
        hard: old.maximum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_caps_per_key_and_in_total_and_frees_on_drop() {
        let g = Gate::new(3, 2);
        let a1 = g.enter("a").unwrap();
        let _a2 = g.enter("a").unwrap();
        assert_eq!(g.enter("a").err(), Some(Full::PerKey));
        let _b1 = g.enter("b").unwrap();
        assert_eq!(g.enter("c").err(), Some(Full::Total));
        drop(a1);
        let _c = g.enter("c").expect("a dropped permit frees its place");
        assert_eq!(g.total(), 3);
    }

    #[test]
    fn a_gate_forgets_keys_without_permits() {
        let g = Gate::new(10, 1);
        for i in 0..100 {
            drop(g.enter(i).unwrap());
        }
        assert_eq!(g.inner.state.lock().unwrap().per_key.len(), 0);
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let l = raise_nofile_limit().expect("setrlimit to the hard limit is always allowed");
        assert_eq!(l.now, l.hard);
        assert!(l.now >= l.before || l.before.is_none());
    }

    #[test]
    fn log_every_lets_one_line_through_and_counts_the_rest() {
        let l = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        let l = LogEvery::new(Duration::ZERO);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
    }
}
