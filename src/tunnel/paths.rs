//! Warm QUIC paths to the gateways of one region: connected ahead of need, kept alive,
//! reconnected with backoff, and chosen per stream by measured RTT and load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use super::metrics::{PathLabels, TunnelMetrics};
use super::quic::{quic_io, QuicIo};
use super::{Error, TunnelPeer};
use crate::audit::tunnel::TunnelEvent;
use crate::audit::AuditLog;
use crate::clock::Clock;
use crate::identity::CertInfo;
use crate::refusal::Refusal;
use crate::region::Region;
use crate::svid::Identity;

/// Backoff between reconnection attempts of one path.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The least a stream open waits for credit, even when the path wait is nearly spent.
const MIN_OPEN_WAIT: Duration = Duration::from_millis(100);

/// One QUIC connection to one gateway, replaced when lost or when a certificate it was
/// authenticated with rotates away.
pub struct Path {
    pub addr: SocketAddr,
    pub labels: PathLabels,
    conn: ArcSwapOption<Live>,
    /// Streams we opened that are still running (the load).
    active: AtomicUsize,
}

/// A connection of a path.
struct Live {
    conn: quinn::Connection,
    /// When the handshake completed: a restarted peer shows as a young connection.
    since: Instant,
}

impl Path {
    /// The live connection, if up.
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.live().map(|l| l.conn.clone())
    }

    /// How long the live connection has been up, if up.
    pub fn up_for(&self) -> Option<Duration> {
        self.live().map(|l| l.since.elapsed())
    }

    fn live(&self) -> Option<Arc<Live>> {
        self.conn
            .load_full()
            .filter(|l| l.conn.close_reason().is_none())
    }

    /// Lower is better: RTT weighted by the streams already running.
    fn score(&self, conn: &quinn::Connection) -> f64 {
        let rtt = conn.rtt().as_secs_f64().max(1e-5);
        rtt * (1.0 + self.active.load(Ordering::Relaxed) as f64 / 32.0)
    }
}

/// A stream opened on a path.
pub struct PathStream {
    pub io: QuicIo,
    pub load: PathLoad,
}

/// Counts a stream as load on its path until dropped.
pub struct PathLoad {
    pub path: Arc<Path>,
    metrics: TunnelMetrics,
}

impl PathLoad {
    fn new(path: Arc<Path>, metrics: TunnelMetrics) -> Self {
        path.active.fetch_add(1, Ordering::Relaxed);
        metrics.active.get_or_create(&path.labels).inc();
        PathLoad { path, metrics }
    }
}

impl Drop for PathLoad {
    fn drop(&mut self) {
        self.path.active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.active.get_or_create(&self.path.labels).dec();
    }
}

impl PathLoad {
    /// Counts the bytes the stream carried.
    pub fn count(&self, tx: u64, rx: u64) {
        self.metrics.count_bytes(&self.path.labels, tx, rx);
    }
}

/// What the paths to one region need to connect.
pub struct PathsConfig {
    pub endpoint: quinn::Endpoint,
    pub client: quinn::ClientConfig,
    /// The region of the gateways (checked against their chains).
    pub region: Region,
    pub addrs: Vec<SocketAddr>,
    pub metrics: TunnelMetrics,
    pub audit: Arc<AuditLog>,
    /// Our identity: its rotations re-dial the paths, its revocation list re-checks the
    /// gateways' certificates.
    pub identity: Arc<Identity>,
    pub clock: Clock,
    /// How often a connection's gateway certificate is re-checked at the latest.
    pub refresh: Duration,
}

/// The paths to the gateways of one region.
pub struct Paths {
    pub region: Region,
    paths: Vec<Arc<Path>>,
    changed: Notify,
    metrics: TunnelMetrics,
}

impl Paths {
    /// Starts one connecting task per gateway address; returns at once.
    pub fn start(cfg: PathsConfig, stop: watch::Receiver<bool>) -> Arc<Self> {
        let paths = cfg
            .addrs
            .iter()
            .map(|a| {
                Arc::new(Path {
                    addr: *a,
                    labels: PathLabels {
                        peer: a.to_string(),
                        region: cfg.region.to_string(),
                    },
                    conn: ArcSwapOption::empty(),
                    active: AtomicUsize::new(0),
                })
            })
            .collect();
        let me = Arc::new(Paths {
            region: cfg.region.clone(),
            paths,
            changed: Notify::new(),
            metrics: cfg.metrics.clone(),
        });
        let cfg = Arc::new(cfg);
        for p in &me.paths {
            let span = tracing::info_span!("tunnel_path", peer = %p.addr, region = %cfg.region);
            let task = me.clone().maintain(p.clone(), cfg.clone(), stop.clone());
            tokio::spawn(task.instrument(span));
        }
        me
    }

    /// How many paths are up.
    pub fn up(&self) -> usize {
        self.paths
            .iter()
            .filter(|p| p.connection().is_some())
            .count()
    }

    /// All paths (for status pages and tests).
    pub fn all(&self) -> &[Arc<Path>] {
        &self.paths
    }

    /// The best path that is up now.
    pub fn pick(&self) -> Option<(Arc<Path>, quinn::Connection)> {
        self.pick_live().map(|(p, l)| (p, l.conn.clone()))
    }

    fn pick_live(&self) -> Option<(Arc<Path>, Arc<Live>)> {
        self.paths
            .iter()
            .filter_map(|p| p.live().map(|l| (p.clone(), l)))
            .min_by(|(a, la), (b, lb)| a.score(&la.conn).total_cmp(&b.score(&lb.conn)))
    }

    /// Opens a stream on the best path, waiting up to `wait` for one to come up. A path that
    /// fails to open a stream is skipped for the next one.
    pub async fn open(&self, wait: Duration) -> Result<PathStream, Error> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some((path, live)) = self.pick_live() {
                let load = PathLoad::new(path.clone(), self.metrics.clone());
                let conn = &live.conn;
                // A path out of stream credit (the peer's stream limit reached) would otherwise
                // hold this open, and every caller behind it, without bound.
                let left = deadline.saturating_duration_since(Instant::now());
                let opened =
                    match tokio::time::timeout(left.max(MIN_OPEN_WAIT), conn.open_bi()).await {
                        Ok(r) => r,
                        Err(_) => {
                            self.metrics.open_timeouts.inc();
                            return Err(Error::NoStreamCredit {
                                region: self.region.clone(),
                                addr: path.addr,
                                wait,
                            });
                        }
                    };
                match opened {
                    Ok(bi) => {
                        self.metrics.streams.get_or_create(&path.labels).inc();
                        return Ok(PathStream {
                            io: quic_io(bi),
                            load,
                        });
                    }
                    Err(e) => {
                        tracing::debug!(peer = %path.addr, error = %e, "opening a stream failed; trying another path");
                        continue;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::NoPathUp {
                    region: self.region.clone(),
                    configured: self.paths.len(),
                });
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    async fn maintain(
        self: Arc<Self>,
        path: Arc<Path>,
        cfg: Arc<PathsConfig>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = BACKOFF_START;
        let mut ever_up = false;
        let mut rotations = cfg.identity.rotations();
        loop {
            // A rotation during the dial is seen by `hold` and replaces the new connection.
            rotations.borrow_and_update();
            let result = tokio::select! {
                r = dial(&cfg, &path) => r,
                _ = stop.changed() => return,
            };
            let mut lapsed = false;
            match result {
                Ok(up) => {
                    let since = Instant::now();
                    if ever_up {
                        cfg.metrics.reconnects.get_or_create(&path.labels).inc();
                    }
                    ever_up = true;
                    let peer_id = self.path_up(&path, &cfg, &up);
                    let reason = match self.hold(&path, &cfg, up, &mut rotations, &mut stop).await {
                        Down::Stopped => return,
                        Down::Lost(r) => r,
                        Down::Lapsed(r) => {
                            lapsed = true;
                            format!("the gateway's certificate lapsed: {r}")
                        }
                    };
                    self.path_down(&path, &cfg, &reason, peer_id);
                    if lapsed || since.elapsed() > Duration::from_secs(10) {
                        backoff = BACKOFF_START;
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %path.addr, region = %cfg.region, error = %e, "tunnel connection failed");
                }
            }
            // A lapsed gateway certificate is re-dialled at once: the gateway has likely
            // rotated to a new one already.
            if !lapsed {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Publishes a path's new connection (metric, waiters, log, `tunnel_up`); returns the
    /// gateway's ID for the events of its end.
    fn path_up(&self, path: &Path, cfg: &PathsConfig, up: &Up) -> Option<String> {
        let peer_id = Some(up.peer.id.to_string());
        path.conn.store(Some(up.live.clone()));
        cfg.metrics.up.get_or_create(&path.labels).set(1);
        self.changed.notify_waiters();
        tracing::info!(peer = %path.addr, region = %cfg.region, rtt_ms = up.live.conn.rtt().as_millis() as u64, "tunnel path up");
        let mut ev = TunnelEvent::new(&cfg.clock, "tunnel_up", path.addr, Some(&cfg.region), "");
        ev.peer_id = peer_id.clone();
        cfg.audit.record(&ev);
        peer_id
    }

    /// Withdraws a lost path's connection (metric, log, `tunnel_down`, and `failover` when
    /// other paths to the region are up), then wakes the waiters.
    fn path_down(&self, path: &Path, cfg: &PathsConfig, reason: &str, peer_id: Option<String>) {
        path.conn.store(None);
        cfg.metrics.up.get_or_create(&path.labels).set(0);
        let others = self.up();
        tracing::warn!(peer = %path.addr, region = %cfg.region, %reason, other_paths_up = others, "tunnel path lost");
        let mut ev = TunnelEvent::new(
            &cfg.clock,
            "tunnel_down",
            path.addr,
            Some(&cfg.region),
            format!("{reason}; {others} other path(s) to the region up"),
        );
        ev.peer_id = peer_id.clone();
        cfg.audit.record(&ev);
        if others > 0 {
            cfg.metrics.failovers.inc();
            let mut ev = TunnelEvent::new(
                &cfg.clock,
                "failover",
                path.addr,
                Some(&cfg.region),
                format!("new streams go to the {others} remaining path(s)"),
            );
            ev.peer_id = peer_id;
            cfg.audit.record(&ev);
        }
        self.changed.notify_waiters();
    }

    /// Holds a path's connection until it is lost, its gateway's certificate lapses (revoked,
    /// expired), or we stop. On each rotation of our SVID, and ahead of the gateway
    /// certificate's expiry, a new connection is dialled and takes the new streams; the old one
    /// is closed once its streams end, or when a certificate it was authenticated with expires.
    async fn hold(
        &self,
        path: &Path,
        cfg: &PathsConfig,
        mut up: Up,
        rotations: &mut watch::Receiver<u64>,
        stop: &mut watch::Receiver<bool>,
    ) -> Down {
        let mut revocations = cfg.identity.revocations();
        let mut retry = false;
        loop {
            let conn = up.live.conn.clone();
            let wait = if retry {
                REPLACE_RETRY
            } else {
                next_check(cfg, &up)
            };
            let rotated = tokio::select! {
                e = conn.closed() => return Down::Lost(e.to_string()),
                _ = sample_rtt(&conn, &path.labels, &cfg.metrics) => unreachable!(),
                _ = stop.changed() => {
                    conn.close(quinn::VarInt::from_u32(0), b"shutting down");
                    return Down::Stopped;
                }
                Ok(()) = rotations.changed() => true,
                Ok(()) = revocations.changed() => false,
                _ = tokio::time::sleep(wait) => false,
            };
            if let Some(reason) = remote_lapsed(cfg, up.remote.as_ref()) {
                close_lapsed(path, cfg, &up, reason);
                return Down::Lapsed(reason);
            }
            let due = up.renew_at.is_some_and(|t| cfg.clock.now() >= t);
            if !(rotated || retry || due) {
                continue;
            }
            rotations.borrow_and_update();
            let new = tokio::select! {
                r = dial(cfg, path) => r,
                _ = stop.changed() => {
                    conn.close(quinn::VarInt::from_u32(0), b"shutting down");
                    return Down::Stopped;
                }
            };
            match new {
                Ok(new) => {
                    self.replace(path, cfg, &mut up, new, rotated);
                    retry = false;
                }
                Err(e) => {
                    tracing::debug!(peer = %path.addr, region = %cfg.region, error = %e, "replacing a tunnel connection failed; the current one stays");
                    retry = true;
                }
            }
        }
    }

    /// Puts a new connection in place of `up` for new streams; the old one drains until its
    /// streams end or a certificate it was authenticated with expires.
    fn replace(&self, path: &Path, cfg: &PathsConfig, up: &mut Up, mut new: Up, rotated: bool) {
        // Replaced for the gateway's expiry, but it has not rotated yet (its renewal is late):
        // tried again halfway to the expiry. (After our own rotation the same gateway
        // certificate is expected, and its planned replacement stands.)
        let same = new.remote.as_ref().map(|c| &c.serial) == up.remote.as_ref().map(|c| &c.serial);
        if same && !rotated {
            new.renew_at = retry_before_expiry(cfg.clock.now(), new.remote.as_ref());
        }
        cfg.metrics.replaced.get_or_create(&path.labels).inc();
        let why = if rotated {
            "our certificate rotated"
        } else {
            "the gateway's certificate nears expiry"
        };
        tracing::info!(peer = %path.addr, region = %cfg.region, why, "tunnel path replaced");
        let mut ev = TunnelEvent::new(
            &cfg.clock,
            "tunnel_replaced",
            path.addr,
            Some(&cfg.region),
            why,
        );
        ev.peer_id = Some(new.peer.id.to_string());
        cfg.audit.record(&ev);
        path.conn.store(Some(new.live.clone()));
        self.changed.notify_waiters();
        let old = std::mem::replace(up, new);
        let until = old.expires().map_or(cfg.refresh, |t| {
            t.duration_since(cfg.clock.now()).unwrap_or_default()
        });
        tokio::spawn(drain(old.live.conn.clone(), until).in_current_span());
    }
}

/// Closes a held connection whose gateway certificate no longer passes (`reason`), with a log
/// line and a `tunnel_closed` event.
fn close_lapsed(path: &Path, cfg: &PathsConfig, up: &Up, reason: Refusal) {
    let label = reason.label();
    tracing::warn!(peer = %path.addr, region = %cfg.region, reason = label, "closing a tunnel path: the gateway's certificate no longer passes");
    let mut ev = TunnelEvent::new(
        &cfg.clock,
        "tunnel_closed",
        path.addr,
        Some(&cfg.region),
        label,
    );
    ev.peer_id = Some(up.peer.id.to_string());
    cfg.audit.record(&ev);
    up.live.conn.close(
        quinn::VarInt::from_u32(super::code::REFUSED),
        label.as_bytes(),
    );
}

/// How a held connection ended.
enum Down {
    Stopped,
    Lost(String),
    /// The gateway's certificate was revoked or expired (the reason).
    Lapsed(Refusal),
}

/// How soon a failed replacement is tried again.
const REPLACE_RETRY: Duration = Duration::from_secs(1);

/// A connection that is up, and the certificates it was authenticated with.
struct Up {
    live: Arc<Live>,
    peer: TunnelPeer,
    /// The gateway's leaf.
    remote: Option<CertInfo>,
    /// The expiry of our SVID when we dialled (the one the handshake presented, or an older one
    /// if a rotation raced the dial; then `hold` replaces the connection at once).
    own_not_after: Option<SystemTime>,
    /// When to replace the connection ahead of the gateway certificate's expiry: two thirds
    /// into its lifetime, after the gateway has renewed (at 40–60 %), which leaves the old one a
    /// third of a lifetime to drain.
    renew_at: Option<SystemTime>,
}

impl Up {
    /// When the first of the certificates it was authenticated with expires.
    fn expires(&self) -> Option<SystemTime> {
        let remote = self.remote.as_ref().map(|c| c.not_after);
        match (self.own_not_after, remote) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Halfway from `now` to the certificate's expiry, unless that is under [`BACKOFF_START`] away.
fn retry_before_expiry(now: SystemTime, cert: Option<&CertInfo>) -> Option<SystemTime> {
    let left = cert?.not_after.duration_since(now).ok()?;
    (left / 2 >= BACKOFF_START).then(|| now + left / 2)
}

/// Dials `path`'s gateway and checks that it is one of the region.
async fn dial(cfg: &PathsConfig, path: &Path) -> Result<Up, Error> {
    let own_not_after = cfg.identity.current().map(|s| s.info.not_after);
    let connecting = cfg
        .endpoint
        .connect_with(cfg.client.clone(), path.addr, "gateway.trustline")
        .map_err(Error::Connect)?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| Error::ConnectTimeout)?
        .map_err(Error::Connection)?;
    let peer = check_gateway(&conn, &cfg.region)?;
    let remote = super::peer_chain(&conn)
        .first()
        .and_then(|c| crate::identity::inspect_cert(c).ok());
    let renew_at = remote
        .as_ref()
        .and_then(|c| c.not_after.checked_sub(c.issued_lifetime() / 3));
    Ok(Up {
        live: Arc::new(Live {
            conn,
            since: Instant::now(),
        }),
        peer,
        remote,
        own_not_after,
        renew_at,
    })
}

/// Until the next re-check of a held connection: the refresh interval, or sooner the gateway
/// certificate's expiry or the planned replacement.
fn next_check(cfg: &PathsConfig, up: &Up) -> Duration {
    let now = cfg.clock.now();
    let until =
        |t: SystemTime| t.duration_since(now).unwrap_or_default() + Duration::from_millis(1);
    let mut wait = cfg.refresh;
    if let Some(c) = &up.remote {
        wait = wait.min(until(c.not_after));
    }
    if let Some(t) = up.renew_at {
        wait = wait.min(until(t));
    }
    wait
}

/// Why a held connection's gateway certificate no longer passes (`revoked`,
/// `expired_certificate`).
fn remote_lapsed(cfg: &PathsConfig, cert: Option<&CertInfo>) -> Option<Refusal> {
    let c = cert?;
    if cfg.identity.revoked.load().contains(&c.serial) {
        Some(Refusal::Revoked)
    } else if cfg.clock.now() >= c.not_after {
        Some(Refusal::ExpiredCertificate)
    } else {
        None
    }
}

/// Closes a replaced connection when the first certificate it was authenticated with expires.
/// New streams have gone to its successor since the replacement; the ones still riding it by
/// then (sessions retire well before, see `session::SESSION_AGE_DIVISOR`) are cut.
// TODO: close it as soon as its last stream ends; a first try that counted the streams per
// connection closed some under live streams (see SECURITY.md).
async fn drain(conn: quinn::Connection, until: Duration) {
    // Ends early when the connection does (the endpoint closing, the peer closing it): a held
    // connection keeps the endpoint's socket bound.
    tokio::select! {
        _ = tokio::time::sleep(until) => {
            conn.close(quinn::VarInt::from_u32(0), b"replaced; certificate expired");
        }
        _ = conn.closed() => {}
    }
}

async fn sample_rtt(conn: &quinn::Connection, labels: &PathLabels, m: &TunnelMetrics) {
    loop {
        m.rtt.get_or_create(labels).set(conn.rtt().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A gateway's certificate must name a gateway of `region` and chain to that region's CA.
pub fn check_gateway(conn: &quinn::Connection, region: &str) -> Result<TunnelPeer, Error> {
    let checked = TunnelPeer::of(conn).and_then(|p| match p.gateway_of() {
        Some(r) if r == region => Ok(p),
        _ => Err(Error::NotGatewayOfRegion {
            id: p.id,
            issued_in: p.issued_in,
            region: region.to_string(),
        }),
    });
    if let Err(why) = &checked {
        conn.close(
            quinn::VarInt::from_u32(super::code::REFUSED),
            why.to_string().as_bytes(),
        );
    }
    checked
}
