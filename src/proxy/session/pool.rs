//! Warm sidecar-to-sidecar sessions (the calling side): one mutual TLS 1.3 connection per
//! destination sidecar, with HTTP/2 inside; each application connection is one `CONNECT` stream.
//! A session to another region is carried over a gateway path (see the module docs of
//! [`crate::tunnel`] for why); one to a sidecar of our own region is a direct TCP connection
//! (`pooling`, on by default), so a new application connection costs a stream, not a handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::sync::{watch, Notify};

use super::{H2Stream, MAX_FRAME, SESSION_WINDOW, STREAM_WINDOW};
use crate::clock::Clock;
use crate::region::{Region, ServiceName};
use crate::svid::Identity;
use crate::tls::mesh::{self, MeshServerVerifier};
use crate::tunnel::header::StreamHeader;
use crate::tunnel::paths::{PathStream, Paths};
use crate::tunnel::PATH_WAIT;

/// Where a session goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Index of the service in the sidecar's config.
    pub service: usize,
    pub name: ServiceName,
    /// The destination's region when it is not ours (through the gateways); `None`: direct.
    pub region: Option<Region>,
    pub addr: SocketAddr,
}

/// Why a stream could not be opened: a metric label and the details.
#[derive(Debug)]
pub struct Failure {
    pub reason: &'static str,
    pub detail: String,
}

fn fail(reason: &'static str, detail: impl ToString) -> Failure {
    Failure {
        reason,
        detail: detail.to_string(),
    }
}

/// An open session and what its authentication is good for.
struct Live {
    generation: u64,
    /// The rotation count of our identity when the session was opened: a session is retired at
    /// the next rotation, so new streams always ride the newest SVID, as new handshakes do.
    rotation: u64,
    /// The earlier expiry of the two certificates the session was authenticated with.
    not_after: SystemTime,
    /// The destination's certificate: the session is retired when it is revoked.
    peer_serial: crate::identity::Serial,
    /// When the session takes no more new streams however long its certificates last: the
    /// gateways' tunnel connections it rides are replaced on their own rotations and closed at
    /// their certificates' expiry, which leaves them at least ~40 % of an SVID lifetime to drain;
    /// a session retired after a fifth of one has moved off them by then.
    retire_at: SystemTime,
    send: h2::client::SendRequest<Bytes>,
}

#[derive(Default)]
struct Entry {
    live: Mutex<Option<Live>>,
    dial: tokio::sync::Mutex<()>,
    ended: Notify,
    /// When a stream was last opened, in milliseconds since the pool started.
    last_used: AtomicU64,
}

impl Entry {
    /// Drops the session if it is still the one of `generation`: no new stream will use it.
    fn retire(&self, generation: u64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|l| l.generation == generation) {
            *live = None;
        }
    }
}

/// How long a session handshake may take, and how long a same-region session may go without a
/// new stream before it is closed.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub handshake: Duration,
    pub idle: Duration,
}

/// Per service: the TLS client (session ALPN, the service's expected IDs) and its verifier.
pub struct ServiceTls {
    pub connector: tokio_rustls::TlsConnector,
    pub verifier: Arc<MeshServerVerifier>,
}

/// The sessions of one sidecar.
pub struct SessionPool {
    /// This region's gateways, when a service is in another region.
    gateways: Option<Arc<Paths>>,
    tls: Vec<Option<ServiceTls>>,
    identity: Arc<Identity>,
    clock: Clock,
    timeouts: Timeouts,
    started: std::time::Instant,
    entries: Mutex<HashMap<Target, Arc<Entry>>>,
    generation: AtomicU64,
    /// Sessions established (cold starts), for metrics and tests.
    pub established: AtomicU64,
    /// Sessions closed, with their open streams, because the destination's certificate was
    /// revoked or expired.
    pub closed_for_peer: Arc<AtomicU64>,
}

impl SessionPool {
    pub fn new(
        gateways: Option<Arc<Paths>>,
        tls: Vec<Option<ServiceTls>>,
        identity: Arc<Identity>,
        clock: Clock,
        timeouts: Timeouts,
    ) -> Arc<Self> {
        Arc::new(SessionPool {
            gateways,
            tls,
            identity,
            clock,
            timeouts,
            started: std::time::Instant::now(),
            entries: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            established: AtomicU64::new(0),
            closed_for_peer: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The local gateways' paths, when a service is in another region.
    pub fn gateways(&self) -> Option<&Arc<Paths>> {
        self.gateways.as_ref()
    }

    /// The entry's session if it may still carry new streams; a retired one is dropped (its open
    /// streams go on). Returns the session and when it must be retired at the latest.
    fn current(&self, entry: &Entry) -> Option<(h2::client::SendRequest<Bytes>, SystemTime)> {
        let mut live = entry.live.lock().unwrap_or_else(|e| e.into_inner());
        let l = live.as_ref()?;
        if l.rotation == *self.identity.rotations().borrow()
            && self.clock.now() < l.not_after.min(l.retire_at)
            && !self.identity.revoked.load().contains(&l.peer_serial)
        {
            return Some((l.send.clone(), l.not_after));
        }
        *live = None;
        None
    }

    /// Whether new connections to `service` ride a session (a service of another region, or
    /// any service with `pooling`).
    pub fn serves(&self, service: usize) -> bool {
        self.tls.get(service).is_some_and(Option::is_some)
    }

    fn entry(&self, t: &Target) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(t) {
            Some(e) => e.clone(),
            None => entries.entry(t.clone()).or_default().clone(),
        }
    }

    /// Forgets every session: streams already open go on, new ones dial a new session (tests
    /// and the cold-start benchmark use this).
    pub fn forget_all(&self) {
        for e in self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            e.live.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Opens a new stream to `target`: on the warm session if there is one, else after opening
    /// it. The returned stream is writable at once; the destination's verdict arrives with the
    /// first read.
    pub async fn connect(self: &Arc<Self>, target: &Target) -> Result<H2Stream, Failure> {
        let entry = self.entry(target);
        entry
            .last_used
            .store(millis_since(self.started), Ordering::Relaxed);
        for attempt in 0..2 {
            let (mut send, _) = self.session(target, &entry).await?;
            match send.clone().ready().await {
                Ok(s) => send = s,
                Err(e) => {
                    // The session died since it was stored: drop it and dial once more.
                    tracing::debug!(error = %e, attempt, "session closed; opening a new one");
                    entry.live.lock().unwrap_or_else(|e| e.into_inner()).take();
                    continue;
                }
            }
            let req = hyper::Request::builder()
                .method(hyper::Method::CONNECT)
                .uri(target.addr.to_string())
                .body(())
                .map_err(|e| fail("bad_request", e))?;
            match send.send_request(req, false) {
                Ok((response, stream)) => return Ok(H2Stream::client(stream, response)),
                Err(e) => {
                    entry.live.lock().unwrap_or_else(|e| e.into_inner()).take();
                    tracing::debug!(error = %e, attempt, "session refused a stream; opening a new one");
                }
            }
        }
        Err(fail("session_lost", "the session closed twice in a row"))
    }

    /// The usable session of `entry`, dialled if there is none.
    async fn session(
        self: &Arc<Self>,
        target: &Target,
        entry: &Arc<Entry>,
    ) -> Result<(h2::client::SendRequest<Bytes>, SystemTime), Failure> {
        if let Some(s) = self.current(entry) {
            return Ok(s);
        }
        let _dialing = entry.dial.lock().await;
        if let Some(s) = self.current(entry) {
            return Ok(s);
        }
        self.dial(target, entry).await
    }

    async fn dial(
        self: &Arc<Self>,
        target: &Target,
        entry: &Arc<Entry>,
    ) -> Result<(h2::client::SendRequest<Bytes>, SystemTime), Failure> {
        self.identity.ready().map_err(|e| fail("not_ready", e))?;
        // Read before the handshake: a rotation during it retires the session at once.
        let rotation = *self.identity.rotations().borrow();
        let own = self
            .identity
            .current()
            .ok_or_else(|| fail("not_ready", "no SVID"))?;
        let own_not_after = own.info.not_after;
        let retire_at = self.clock.now() + own.info.issued_lifetime() / SESSION_AGE_DIVISOR;
        let tls = self.tls[target.service].as_ref().ok_or_else(|| {
            fail(
                "no_route",
                format!("{} has no session configuration", target.name),
            )
        })?;
        let opened = Opened {
            rotation,
            own_not_after,
            retire_at,
        };
        let Some(region) = &target.region else {
            let tcp = tokio::net::TcpStream::connect(target.addr)
                .await
                .map_err(|e| fail("upstream_unreachable", e))?;
            let _ = tcp.set_nodelay(true);
            return self
                .establish(target, entry, tls, tcp, opened, (), "direct".into())
                .await;
        };
        let gateways = self.gateways.as_ref().ok_or_else(|| {
            fail(
                "no_gateway",
                format!(
                    "{} is in region {region} and no gateway is configured",
                    target.name
                ),
            )
        })?;
        let mut path = gateways
            .open(PATH_WAIT)
            .await
            .map_err(|e| fail("no_gateway", e))?;
        let header = StreamHeader {
            region: region.clone(),
            service: target.name.clone(),
            addr: target.addr,
        }
        .encode();
        // The header goes out with the ClientHello (no wait for an answer).
        path.io
            .writer_mut()
            .write_all(&header)
            .await
            .map_err(|e| fail("gateway_lost", e))?;
        let via = path.load.path.addr.to_string();
        let PathStream { io, load } = path;
        self.establish(target, entry, tls, io, opened, load, via)
            .await
    }

    /// The handshake and HTTP/2 preface over `io`, then the session is stored in `entry`;
    /// `keep` lives as long as the session (a gateway path's load count).
    #[allow(clippy::too_many_arguments)]
    async fn establish<IO, K>(
        self: &Arc<Self>,
        target: &Target,
        entry: &Arc<Entry>,
        tls: &ServiceTls,
        io: IO,
        opened: Opened,
        keep: K,
        via: String,
    ) -> Result<(h2::client::SendRequest<Bytes>, SystemTime), Failure>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        K: Send + 'static,
    {
        let name = ServerName::try_from(target.name.to_string())
            .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("valid name"));
        let connect = tls.connector.connect(name, io);
        let stream = match tokio::time::timeout(self.timeouts.handshake, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(fail(session_failure(&e), e)),
            Err(_) => return Err(fail("handshake_timeout", "session handshake timed out")),
        };
        mesh::recheck_resumed_server(stream.get_ref().1, &tls.verifier, &self.clock)
            .map_err(|e| fail(mesh::tls_reason(&e), e))?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| crate::identity::inspect_cert(leaf).ok())
            .ok_or_else(|| {
                fail(
                    "no_server_certificate",
                    "the session has no peer certificate",
                )
            })?;
        let not_after = opened.own_not_after.min(peer.not_after);
        let (send, conn) = h2::client::Builder::new()
            .max_frame_size(MAX_FRAME)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(SESSION_WINDOW)
            .max_concurrent_reset_streams(1024)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| fail("session_failed", e))?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        *entry.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(Live {
            generation,
            rotation: opened.rotation,
            not_after,
            peer_serial: peer.serial.clone(),
            retire_at: opened.retire_at,
            send: send.clone(),
        });
        self.established.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service = %target.name, region = target.region.as_deref().unwrap_or("(ours)"), addr = %target.addr, via = %via, "session to the destination sidecar established");
        let entry = entry.clone();
        let service = target.name.clone();
        // Same-region sessions are opened on demand, so they are also closed when idle;
        // cross-region ones are kept warm on purpose (`prewarm`).
        let idle = target.region.is_none().then_some(self.timeouts.idle);
        let started = self.started; // not the pool itself: the session must not keep it alive
        let lapse = PeerLapse {
            identity: self.identity.clone(),
            revocations: self.identity.revocations(),
            serial: peer.serial,
            expires_in: peer
                .not_after
                .duration_since(self.clock.now())
                .unwrap_or_default(),
            closed: self.closed_for_peer.clone(),
        };
        tokio::spawn(async move {
            let _keep = keep;
            tokio::pin!(conn);
            let lapsed = lapse.wait();
            tokio::pin!(lapsed);
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
                    reason = &mut lapsed => {
                        // Dropping the connection ends every stream on it, not only new ones.
                        tracing::warn!(reason, %service, "session closed with its open streams: the destination's certificate no longer passes");
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
        });
        Ok((send, not_after))
    }

    /// Keeps a session open to every target, re-opening it as soon as one is lost or retired
    /// (our rotation, a certificate's expiry), so new connections never wait for a handshake.
    pub async fn prewarm(self: Arc<Self>, targets: Vec<Target>, stop: watch::Receiver<bool>) {
        for t in targets {
            let me = self.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let entry = me.entry(&t);
                let mut rotations = me.identity.rotations();
                loop {
                    let ended = entry.ended.notified();
                    // Until the session must be retired, or a retry after a failure.
                    let (up, wait) = match me.session(&t, &entry).await {
                        Ok((_, not_after)) => (
                            true,
                            not_after.duration_since(me.clock.now()).unwrap_or_default(),
                        ),
                        Err(f) => {
                            tracing::debug!(reason = f.reason, detail = %f.detail, service = %t.name, "pre-warming a session failed");
                            (false, Duration::from_millis(500))
                        }
                    };
                    tokio::select! {
                        _ = ended, if up => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = rotations.changed() => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
    }
}

/// Milliseconds since `started` (a pool's start): the clock of `Entry::last_used`.
/// What ends a session whatever its streams: the destination's certificate revoked (seen on
/// our revocation list) or expired.
struct PeerLapse {
    identity: Arc<Identity>,
    revocations: tokio::sync::watch::Receiver<u64>,
    serial: crate::identity::Serial,
    expires_in: Duration,
    closed: Arc<AtomicU64>,
}

impl PeerLapse {
    /// Waits until the certificate lapses; the reason.
    async fn wait(mut self) -> &'static str {
        let expiry = tokio::time::sleep(self.expires_in);
        tokio::pin!(expiry);
        let reason = loop {
            if self.identity.revoked.load().contains(&self.serial) {
                break "revoked";
            }
            tokio::select! {
                _ = &mut expiry => break "expired_certificate",
                r = self.revocations.changed() => {
                    if r.is_err() {
                        // The identity is gone (shutting down): expiry still holds.
                        (&mut expiry).await;
                        break "expired_certificate";
                    }
                }
            }
        };
        self.closed.fetch_add(1, Ordering::Relaxed);
        reason
    }
}

fn millis_since(started: std::time::Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

/// What a session's authentication is good for, read before its handshake.
struct Opened {
    rotation: u64,
    own_not_after: SystemTime,
    retire_at: SystemTime,
}

/// A session takes new streams for at most this fraction (1/N) of our SVID's lifetime.
const SESSION_AGE_DIVISOR: u32 = 5;

fn session_failure(e: &std::io::Error) -> &'static str {
    match crate::tunnel::quic::reset_code(e) {
        Some(c) => crate::tunnel::code::label(c as u64),
        None => mesh::failure_reason(e),
    }
}
