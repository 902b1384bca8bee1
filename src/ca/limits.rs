//! What bounds the CA API under abuse: connection caps (in total and per client address), the
//! per-client SVID request rate, and the metrics that count what they refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::limits::{client_key, Full, Gate, LogEvery, Permit};

/// The GET endpoints' per-client rate is this many times the SVID request rate: sidecars and
/// peer CAs poll them, and a cached answer is cheap, but not free.
pub const READ_RATE_FACTOR: u32 = 10;
/// Clients the rate limiter tracks at once; beyond that, new clients share one bucket.
const MAX_CLIENTS: usize = 65_536;
/// How often, at most, a full rate limiter looks for clients to forget.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Why a connection was closed before it was served.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `max_connections`, `max_connections_per_client`, `handshake_timeout`,
    /// `handshake_failed`, `header_timeout`.
    pub reason: &'static str,
}

/// Connection caps of the API listener and what they did.
pub struct ConnLimits {
    gate: Gate<IpAddr>,
    /// Connections closed early, by reason.
    pub refused: Family<RefusedLabels, Counter>,
    /// Connections open now.
    pub open: Gauge,
    log: LogEvery,
}

/// A served connection's place; dropping it frees the place.
pub struct ConnPermit {
    _permit: Permit<IpAddr>,
    open: Gauge,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl ConnLimits {
    /// Caps of `max_total` connections, `max_per_client` per client address; registers the
    /// metrics.
    pub fn new(max_total: usize, max_per_client: usize, registry: &mut Registry) -> Self {
        let me = ConnLimits {
            gate: Gate::new(max_total, max_per_client),
            refused: Family::default(),
            open: Gauge::default(),
            log: LogEvery::new(Duration::from_secs(1)),
        };
        registry.register(
            "trustline_ca_connections_refused",
            "API connections closed before or instead of being served, by reason",
            me.refused.clone(),
        );
        registry.register(
            "trustline_ca_connections_open",
            "API connections open now",
            me.open.clone(),
        );
        me
    }

    /// Admits a connection from `ip`, or counts and logs (at most once a second) why not.
    pub fn admit(&self, ip: IpAddr) -> Option<ConnPermit> {
        match self.gate.enter(client_key(ip)) {
            Ok(p) => {
                self.open.inc();
                Some(ConnPermit {
                    _permit: p,
                    open: self.open.clone(),
                })
            }
            Err(full) => {
                let reason = match full {
                    Full::Total => "max_connections",
                    Full::PerKey => "max_connections_per_client",
                };
                self.count(reason);
                if let Some(held_back) = self.log.allow() {
                    tracing::warn!(client = %ip, reason, held_back, "CA connection refused: the listener is at its connection cap");
                }
                None
            }
        }
    }

    /// Counts a connection closed early for `reason`.
    pub fn count(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }
}

/// A token bucket per client (IPv4 address, or IPv6 /64), over a bounded map.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    capacity: usize,
    state: Mutex<Buckets>,
}

struct Buckets {
    map: HashMap<IpAddr, Bucket>,
    /// Shared by the clients that find the map full.
    overflow: Bucket,
    pruned: Instant,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `per_sec` requests per second with bursts of twice that; 0 turns limiting off.
    pub fn new(per_sec: u32) -> Self {
        Self::with_capacity(per_sec, MAX_CLIENTS)
    }

    /// [`RateLimiter::new`] tracking at most `capacity` clients.
    pub fn with_capacity(per_sec: u32, capacity: usize) -> Self {
        let burst = (per_sec as f64 * 2.0).max(1.0);
        let now = Instant::now();
        RateLimiter {
            per_sec: per_sec as f64,
            burst,
            capacity,
            state: Mutex::new(Buckets {
                map: HashMap::new(),
                overflow: Bucket {
                    tokens: burst,
                    last: now,
                },
                pruned: now,
            }),
        }
    }

    /// Takes one token for `ip`; false when its bucket is empty.
    ///
    /// Constant work per call: a full map is pruned at most once per [`PRUNE_EVERY`] (of
    /// clients whose bucket has refilled, which forgetting does not change), and while it stays
    /// full, new clients draw from one shared bucket, so spraying addresses buys no extra rate.
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let key = client_key(ip);
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.map.contains_key(&key) && s.map.len() >= self.capacity {
            let refill = Duration::from_secs_f64(self.burst / self.per_sec);
            if now.duration_since(s.pruned) >= PRUNE_EVERY {
                s.pruned = now;
                s.map.retain(|_, b| now.duration_since(b.last) < refill);
            }
        }
        let fresh = Bucket {
            tokens: self.burst,
            last: now,
        };
        let len = s.map.len();
        let bucket = match s.map.get_mut(&key) {
            Some(b) => b,
            None if len < self.capacity => s.map.entry(key).or_insert(fresh),
            None => &mut s.overflow,
        };
        take(bucket, now, self.per_sec, self.burst)
    }

    /// Clients tracked now (tests).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }
}

fn take(b: &mut Bucket, now: Instant, per_sec: f64, burst: f64) -> bool {
    b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * per_sec).min(burst);
    b.last = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn v6(n: u32) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            (n >> 16) as u16,
            n as u16,
            0,
            0,
            0,
            1,
        ))
    }

    #[test]
    fn spraying_addresses_keeps_the_map_bounded_and_buys_no_extra_rate() {
        let r = RateLimiter::with_capacity(1, 1000);
        let known: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(r.allow(known));
        let mut granted = 0;
        for n in 0..50_000 {
            if r.allow(v6(n)) {
                granted += 1;
            }
        }
        assert!(r.tracked() <= 1000, "tracked {} clients", r.tracked());
        // 999 places in the map, then one shared bucket of burst 2 (plus what refills).
        assert!(
            granted < 1000 + 50,
            "{granted} requests granted to the sprayer"
        );
        assert!(
            r.allow(known),
            "a client already known keeps its own bucket"
        );
    }

    #[test]
    fn one_ipv6_64_is_one_client() {
        let r = RateLimiter::new(1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::2".parse().unwrap();
        assert!(r.allow(a));
        assert!(r.allow(b));
        assert!(!r.allow(a), "the /64 spent its burst of 2");
        assert_eq!(r.tracked(), 1);
    }
}
