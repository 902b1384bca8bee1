//! Warm QUIC paths to the gateways of one region: connected ahead of need, kept alive,
//! reconnected with backoff, and chosen per stream by measured RTT and load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::{watch, Notify};

use super::metrics::{PathLabels, TunnelEvent, TunnelMetrics};
use super::stream::{quic_io, QuicIo};
use super::TunnelPeer;
use crate::audit::AuditLog;

/// Backoff between reconnection attempts of one path.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The least a stream open waits for credit, even when the path wait is nearly spent.
const MIN_OPEN_WAIT: Duration = Duration::from_millis(100);

/// One QUIC connection to one gateway, replaced when lost.
pub struct Path {
    pub addr: SocketAddr,
    pub labels: PathLabels,
    conn: ArcSwapOption<quinn::Connection>,
    /// Streams we opened that are still running (the load).
    active: AtomicUsize,
}

impl Path {
    /// The live connection, if up.
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.conn
            .load_full()
            .filter(|c| c.close_reason().is_none())
            .map(|c| (*c).clone())
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
    pub region: String,
    pub addrs: Vec<SocketAddr>,
    pub metrics: TunnelMetrics,
    pub audit: Arc<AuditLog>,
}

/// The paths to the gateways of one region.
pub struct Paths {
    pub region: String,
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
                        region: cfg.region.clone(),
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
            tokio::spawn(me.clone().maintain(p.clone(), cfg.clone(), stop.clone()));
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
        self.paths
            .iter()
            .filter_map(|p| p.connection().map(|c| (p.clone(), c)))
            .min_by(|(a, ca), (b, cb)| a.score(ca).total_cmp(&b.score(cb)))
    }

    /// Opens a stream on the best path, waiting up to `wait` for one to come up. A path that
    /// fails to open a stream is skipped for the next one.
    pub async fn open(&self, wait: Duration) -> Result<PathStream, String> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some((path, conn)) = self.pick() {
                // A path out of stream credit (the peer's stream limit reached) would otherwise
                // hold this open, and every caller behind it, without bound.
                let left = deadline.saturating_duration_since(Instant::now());
                let opened =
                    match tokio::time::timeout(left.max(MIN_OPEN_WAIT), conn.open_bi()).await {
                        Ok(r) => r,
                        Err(_) => {
                            self.metrics.open_timeouts.inc();
                            return Err(format!(
                                "no stream credit on the path to region {} ({}) within {wait:?}",
                                self.region, path.addr
                            ));
                        }
                    };
                match opened {
                    Ok(bi) => {
                        path.active.fetch_add(1, Ordering::Relaxed);
                        self.metrics.active.get_or_create(&path.labels).inc();
                        self.metrics.streams.get_or_create(&path.labels).inc();
                        return Ok(PathStream {
                            io: quic_io(bi),
                            load: PathLoad {
                                path,
                                metrics: self.metrics.clone(),
                            },
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
                return Err(format!(
                    "no gateway path to region {} is up ({} configured)",
                    self.region,
                    self.paths.len()
                ));
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
        loop {
            let attempt = async {
                let connecting = cfg
                    .endpoint
                    .connect_with(cfg.client.clone(), path.addr, "gateway.trustline")
                    .map_err(|e| e.to_string())?;
                let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                    .await
                    .map_err(|_| "connection timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                let peer = check_gateway(&conn, &cfg.region)?;
                Ok::<_, String>((conn, peer))
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = stop.changed() => return,
            };
            match result {
                Ok((conn, peer)) => {
                    let since = Instant::now();
                    if ever_up {
                        cfg.metrics.reconnects.get_or_create(&path.labels).inc();
                    }
                    ever_up = true;
                    let peer_id = Some(peer.id.to_string());
                    path.conn.store(Some(Arc::new(conn.clone())));
                    cfg.metrics.up.get_or_create(&path.labels).set(1);
                    self.changed.notify_waiters();
                    tracing::info!(peer = %path.addr, region = %cfg.region, rtt_ms = conn.rtt().as_millis() as u64, "tunnel path up");
                    let mut ev = TunnelEvent::new("tunnel_up", path.addr, Some(&cfg.region), "");
                    ev.peer_id = peer_id.clone();
                    cfg.audit.record(&ev);
                    let reason = tokio::select! {
                        e = conn.closed() => e.to_string(),
                        _ = sample_rtt(&conn, &path.labels, &cfg.metrics) => unreachable!(),
                        _ = stop.changed() => {
                            conn.close(quinn::VarInt::from_u32(0), b"shutting down");
                            return;
                        }
                    };
                    path.conn.store(None);
                    cfg.metrics.up.get_or_create(&path.labels).set(0);
                    let others = self.up();
                    tracing::warn!(peer = %path.addr, region = %cfg.region, %reason, other_paths_up = others, "tunnel path lost");
                    let mut ev = TunnelEvent::new(
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
                            "failover",
                            path.addr,
                            Some(&cfg.region),
                            format!("new streams go to the {others} remaining path(s)"),
                        );
                        ev.peer_id = peer_id;
                        cfg.audit.record(&ev);
                    }
                    self.changed.notify_waiters();
                    if since.elapsed() > Duration::from_secs(10) {
                        backoff = BACKOFF_START;
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %path.addr, region = %cfg.region, error = %e, "tunnel connection failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

async fn sample_rtt(conn: &quinn::Connection, labels: &PathLabels, m: &TunnelMetrics) {
    loop {
        m.rtt.get_or_create(labels).set(conn.rtt().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A gateway's certificate must name a gateway of `region` and chain to that region's CA.
pub fn check_gateway(conn: &quinn::Connection, region: &str) -> Result<TunnelPeer, String> {
    let checked = TunnelPeer::of(conn).and_then(|p| match p.gateway_of() {
        Some(r) if r == region => Ok(p),
        _ => Err(format!(
            "{} (certificate of region {:?}) is not a gateway of region {region}",
            p.id, p.issued_in
        )),
    });
    if let Err(why) = &checked {
        conn.close(
            quinn::VarInt::from_u32(super::code::REFUSED),
            why.as_bytes(),
        );
    }
    checked
}
