//! Warm sidecar-to-sidecar sessions (the calling side): one mutual TLS 1.3 connection per
//! destination sidecar, with HTTP/2 inside; each application connection is one `CONNECT` stream.
//! A session to another region is carried over a gateway path (see the module docs of
//! [`crate::tunnel`] for why); one to a sidecar of our own region is a direct TCP connection
//! (`pooling`, on by default), so a new application connection costs a stream, not a handshake.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::reauth;
use super::{H2Stream, MAX_FRAME, SESSION_WINDOW, STREAM_WINDOW};
use crate::clock::Clock;
use crate::identity::CertInfo;
use crate::proxy::outbound::OutboundService;
use crate::refusal::Refusal;
use crate::region::{Region, ServiceName};
use crate::svid::Identity;
use crate::tls::mesh::{self, MeshServerVerifier};
use crate::tunnel::header::StreamHeader;
use crate::tunnel::paths::{PathStream, Paths};
use crate::tunnel::PATH_WAIT;
use driver::{Driver, PeerLapse};
pub use renew::ReauthCounts;
use renew::{Renewer, Term};

mod driver;
mod renew;

/// Where a session goes: one address of one service. Two targets are the same when they name
/// the same service (the same [`OutboundService`], not only the same name) and address.
#[derive(Clone)]
pub(crate) struct Target {
    pub service: Arc<OutboundService>,
    pub addr: SocketAddr,
}

impl Target {
    /// The service's name.
    pub fn name(&self) -> &ServiceName {
        &self.service.name
    }

    /// The destination's region when it is not ours (through the gateways); `None`: direct.
    pub fn region(&self) -> Option<&Region> {
        self.service.region.as_ref()
    }

    /// The region for logs: `(ours)` when direct.
    pub fn region_label(&self) -> &str {
        self.region().map_or("(ours)", Region::as_str)
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.service, &other.service) && self.addr == other.addr
    }
}

impl Eq for Target {}

impl Hash for Target {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.service), state);
        self.addr.hash(state);
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", self.name())
            .field("region", &self.region())
            .field("addr", &self.addr)
            .finish()
    }
}

/// Why a stream could not be opened: the reason (a metric label) and the details.
#[derive(Debug)]
pub struct Failure {
    pub reason: Refusal,
    pub detail: String,
}

fn fail(reason: Refusal, detail: impl ToString) -> Failure {
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
    /// Held by this entry and by every stream of the session: once the session is retired and
    /// its last stream is gone, its re-authentication stops (so the connection may close).
    in_use: Arc<InUse>,
    /// Streams open on the session, to see when it is full: h2 queues a stream over the
    /// destination's `max_concurrent_streams` without bound instead of refusing it.
    open: Arc<AtomicUsize>,
}

impl Live {
    fn usable(&self) -> Usable {
        Usable {
            send: self.send.clone(),
            not_after: self.not_after,
            generation: self.generation,
            open: self.open.clone(),
            in_use: self.in_use.clone(),
        }
    }
}

/// A session that may carry a new stream: its handle, when it must be retired at the latest,
/// what a full one needs to be replaced, and the token its streams hold.
struct Usable {
    send: h2::client::SendRequest<Bytes>,
    not_after: SystemTime,
    generation: u64,
    open: Arc<AtomicUsize>,
    in_use: Arc<InUse>,
}

impl Usable {
    /// A place for one more stream, unless every stream the destination allows is taken (a
    /// new one would then wait, unbounded, for one of them to end).
    fn slot(&self) -> Option<StreamSlot> {
        StreamSlot::take(&self.open, self.send.current_max_send_streams())
    }
}

/// See [`Live::in_use`]: its channel closes when the last holder drops it.
pub(super) struct InUse {
    _gone: tokio::sync::oneshot::Sender<()>,
}

/// A stream's place in its session's count of open streams, given back on drop.
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    /// A place if fewer than `max` are taken.
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        Some(StreamSlot(open.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Entry {
    live: Mutex<Option<Live>>,
    dial: tokio::sync::Mutex<()>,
    ended: Notify,
    /// When a stream was last opened, in milliseconds since the pool started.
    last_used: AtomicU64,
    /// The destination's stream limit as last seen (0: not yet), which a new session assumes
    /// until its own SETTINGS arrive (h2 would assume 100, and a burst over a lower limit would
    /// be refused).
    max_streams: AtomicUsize,
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
    identity: Arc<Identity>,
    clock: Clock,
    timeouts: Timeouts,
    started: tokio::time::Instant,
    entries: Mutex<HashMap<Target, Arc<Entry>>>,
    generation: AtomicU64,
    /// Sessions established (cold starts), for metrics and tests.
    pub established: AtomicU64,
    /// Sessions closed, with their open streams, because the destination's certificate was
    /// revoked or expired.
    pub closed_for_peer: Arc<AtomicU64>,
    /// Re-authentications of live sessions, done and refused.
    pub reauth: Arc<ReauthCounts>,
}

/// A transport a session is opened over: a TCP connection or a gateway path stream, what must
/// live as long as the session (a path's load count), and its name for logs.
struct Dialled<IO, K> {
    io: IO,
    keep: K,
    via: String,
}

impl SessionPool {
    pub fn new(
        gateways: Option<Arc<Paths>>,
        identity: Arc<Identity>,
        clock: Clock,
        timeouts: Timeouts,
    ) -> Arc<Self> {
        Arc::new(SessionPool {
            gateways,
            identity,
            clock,
            timeouts,
            started: tokio::time::Instant::now(),
            entries: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            established: AtomicU64::new(0),
            closed_for_peer: Arc::new(AtomicU64::new(0)),
            reauth: Arc::default(),
        })
    }

    /// The local gateways' paths, when a service is in another region.
    pub fn gateways(&self) -> Option<&Arc<Paths>> {
        self.gateways.as_ref()
    }

    /// The entry's session if it may still carry new streams; a retired one is dropped (its open
    /// streams go on). Returns the session and when it must be retired at the latest.
    fn current(&self, entry: &Entry) -> Option<Usable> {
        let mut live = entry.live.lock().unwrap_or_else(|e| e.into_inner());
        let l = live.as_ref()?;
        if l.rotation == *self.identity.rotations().borrow()
            && self.clock.now() < l.not_after.min(l.retire_at)
            && !self.identity.revoked.load().contains(&l.peer_serial)
        {
            return Some(l.usable());
        }
        *live = None;
        None
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
    pub(crate) async fn connect(self: &Arc<Self>, target: &Target) -> Result<H2Stream, Failure> {
        let entry = self.entry(target);
        entry
            .last_used
            .store(millis_since(self.started), Ordering::Relaxed);
        let mut attempt = 0;
        while attempt < 2 {
            let session = self.session(target, &entry).await?;
            entry
                .max_streams
                .store(session.send.current_max_send_streams(), Ordering::Relaxed);
            let Some(slot) = session.slot() else {
                // Retired like a rotated session (its open streams go on, it closes after
                // them); the next one is dialled, as ztunnel's pool does at its stream limit.
                entry.retire(session.generation);
                tracing::debug!(
                    open = session.open.load(Ordering::Relaxed),
                    "session full; opening another"
                );
                attempt += 1;
                continue;
            };
            let Usable {
                mut send, in_use, ..
            } = session;
            match send.clone().ready().await {
                Ok(s) => send = s,
                Err(e) => {
                    // The session died since it was stored: drop it and dial once more.
                    tracing::debug!(error = %e, attempt, "session closed; opening a new one");
                    entry.live.lock().unwrap_or_else(|e| e.into_inner()).take();
                    attempt += 1;
                    continue;
                }
            }
            let req = hyper::Request::builder()
                .method(hyper::Method::CONNECT)
                .uri(target.addr.to_string())
                .body(())
                .map_err(|e| fail(Refusal::BadRequest, e))?;
            match send.send_request(req, false) {
                Ok((response, stream)) => {
                    return Ok(H2Stream::client(stream, response, slot).holding(in_use))
                }
                Err(e) => {
                    entry.live.lock().unwrap_or_else(|e| e.into_inner()).take();
                    tracing::debug!(error = %e, attempt, "session refused a stream; opening a new one");
                    attempt += 1;
                }
            }
        }
        Err(fail(
            Refusal::SessionLost,
            "the session closed twice in a row",
        ))
    }

    /// The usable session of `entry`, dialled if there is none.
    async fn session(
        self: &Arc<Self>,
        target: &Target,
        entry: &Arc<Entry>,
    ) -> Result<Usable, Failure> {
        if let Some(s) = self.current(entry) {
            return Ok(s);
        }
        let _dialing = entry.dial.lock().await;
        if let Some(s) = self.current(entry) {
            return Ok(s);
        }
        self.dial(target, entry).await
    }

    /// Opens a session to `target`: a TCP connection in our region, a gateway path to another.
    async fn dial(
        self: &Arc<Self>,
        target: &Target,
        entry: &Arc<Entry>,
    ) -> Result<Usable, Failure> {
        let opened = self.opened()?;
        let tls = target.service.session_tls.as_ref().ok_or_else(|| {
            fail(
                Refusal::NoRoute,
                format!("{} has no session configuration", target.name()),
            )
        })?;
        let Some(region) = target.region() else {
            let tcp = tokio::net::TcpStream::connect(target.addr)
                .await
                .map_err(|e| fail(Refusal::UpstreamUnreachable, e))?;
            let _ = tcp.set_nodelay(true);
            let direct = Dialled {
                io: tcp,
                keep: (),
                via: "direct".into(),
            };
            return self.establish(target, entry, tls, direct, opened).await;
        };
        let path = self.gateway_path(target, region).await?;
        let via = path.load.path.addr.to_string();
        let PathStream { io, load } = path;
        let dialled = Dialled {
            io,
            keep: load,
            via,
        };
        self.establish(target, entry, tls, dialled, opened).await
    }

    /// What a session opened now is good for (read before its handshake: a rotation during it
    /// retires the session at once).
    fn opened(&self) -> Result<Opened, Failure> {
        self.identity
            .ready()
            .map_err(|e| fail(Refusal::NotReady, e))?;
        let rotation = *self.identity.rotations().borrow();
        let own = self
            .identity
            .current()
            .ok_or_else(|| fail(Refusal::NotReady, "no SVID"))?;
        Ok(Opened {
            rotation,
            own_not_after: own.info.not_after,
            retire_at: self.clock.now() + own.info.issued_lifetime() / SESSION_AGE_DIVISOR,
        })
    }

    /// A stream on a path to one of this region's gateways, its header sent (with the
    /// ClientHello that follows, without waiting for an answer).
    async fn gateway_path(&self, target: &Target, region: &Region) -> Result<PathStream, Failure> {
        let gateways = self.gateways.as_ref().ok_or_else(|| {
            fail(
                Refusal::NoGateway,
                format!(
                    "{} is in region {region} and no gateway is configured",
                    target.name()
                ),
            )
        })?;
        let mut path = gateways
            .open(PATH_WAIT)
            .await
            .map_err(|e| fail(Refusal::NoGateway, e))?;
        let header = StreamHeader {
            region: region.clone(),
            service: target.name().clone(),
            addr: target.addr,
        }
        .encode();
        path.io
            .writer_mut()
            .write_all(&header)
            .await
            .map_err(|e| fail(Refusal::GatewayLost, e))?;
        Ok(path)
    }

    /// The handshake and HTTP/2 preface over `dialled`, then the session is stored in `entry`
    /// and its driver spawned.
    async fn establish<IO, K>(
        self: &Arc<Self>,
        target: &Target,
        entry: &Arc<Entry>,
        tls: &ServiceTls,
        dialled: Dialled<IO, K>,
        opened: Opened,
    ) -> Result<Usable, Failure>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        K: Send + 'static,
    {
        let (stream, peer) = self.handshake(target, tls, dialled.io).await?;
        let not_after = opened.own_not_after.min(peer.not_after);
        let exporter = reauth::exporter(stream.get_ref().1);
        let peer_region = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| crate::identity::peer_region(c, self.identity.id().trust_domain()));
        let (term_tx, term_rx) = watch::channel(Term::of(&peer, &self.clock));
        let known = entry.max_streams.load(Ordering::Relaxed);
        let (send, conn) = h2::client::Builder::new()
            .initial_max_send_streams(if known == 0 { 100 } else { known })
            .max_frame_size(MAX_FRAME)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(SESSION_WINDOW)
            .max_concurrent_reset_streams(1024)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| fail(Refusal::SessionFailed, e))?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (gone, unused) = tokio::sync::oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let live = Live {
            generation,
            rotation: opened.rotation,
            not_after,
            peer_serial: peer.serial.clone(),
            retire_at: opened.retire_at,
            send: send.clone(),
            in_use: Arc::new(InUse { _gone: gone }),
            open,
        };
        let usable = live.usable();
        *entry.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(live);
        self.established.fetch_add(1, Ordering::Relaxed);
        let via = dialled.via;
        tracing::info!(service = %target.name(), region = target.region_label(), addr = %target.addr, via = %via, "session to the destination sidecar established");
        // Not a child of the connection that happened to open it: the session outlives it.
        let span = tracing::info_span!(parent: None, "session", service = %target.name(), addr = %target.addr, via = %via);
        let renewer = exporter.map(|exporter| Renewer {
            send,
            unused,
            exporter,
            identity: self.identity.clone(),
            verifier: tls.verifier.clone(),
            clock: self.clock.clone(),
            peer_id: peer.id.clone(),
            peer_region,
            own_not_after: opened.own_not_after,
            peer_not_after: peer.not_after,
            term: term_tx,
            timeout: self.timeouts.handshake,
            counts: self.reauth.clone(),
        });
        let driver = self.driver(target, entry, generation, term_rx, renewer);
        let keep = dialled.keep;
        tokio::spawn(
            async move {
                let _keep = keep;
                driver.run(conn).await;
            }
            .instrument(span),
        );
        Ok(usable)
    }

    /// The session's TLS handshake within the timeout, a resumed one re-checked, and the
    /// destination's certificate.
    async fn handshake<IO>(
        &self,
        target: &Target,
        tls: &ServiceTls,
        io: IO,
    ) -> Result<(tokio_rustls::client::TlsStream<IO>, CertInfo), Failure>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let connect = tls
            .connector
            .connect(target.service.server_name.clone(), io);
        let stream = match tokio::time::timeout(self.timeouts.handshake, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(fail(session_failure(&e), e)),
            Err(_) => {
                return Err(fail(
                    Refusal::HandshakeTimeout,
                    "session handshake timed out",
                ))
            }
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
                    Refusal::NoServerCertificate,
                    "the session has no peer certificate",
                )
            })?;
        Ok((stream, peer))
    }

    /// What runs a new session of `target` (see [`Driver::run`]).
    fn driver(
        &self,
        target: &Target,
        entry: &Arc<Entry>,
        generation: u64,
        term: watch::Receiver<Term>,
        renewer: Option<Renewer>,
    ) -> Driver {
        Driver {
            entry: entry.clone(),
            generation,
            service: target.name().clone(),
            // Same-region sessions are opened on demand, so they are also closed when idle;
            // cross-region ones are kept warm on purpose (`prewarm`).
            idle: target.region().is_none().then_some(self.timeouts.idle),
            started: self.started, // not the pool itself: the session must not keep it alive
            lapse: PeerLapse {
                identity: self.identity.clone(),
                revocations: self.identity.revocations(),
                term,
                closed: self.closed_for_peer.clone(),
            },
            renewer,
        }
    }

    /// Keeps a session open to every target, re-opening it as soon as one is lost or retired
    /// (our rotation, a certificate's expiry), so new connections never wait for a handshake.
    pub(crate) async fn prewarm(
        self: Arc<Self>,
        targets: Vec<Target>,
        stop: watch::Receiver<bool>,
    ) {
        for t in targets {
            let span = tracing::info_span!("prewarm", service = %t.name(), addr = %t.addr);
            tokio::spawn(self.clone().keep_warm(t, stop.clone()).instrument(span));
        }
    }

    /// Keeps one target's session open (see [`SessionPool::prewarm`]).
    async fn keep_warm(self: Arc<Self>, t: Target, mut stop: watch::Receiver<bool>) {
        let entry = self.entry(&t);
        let mut rotations = self.identity.rotations();
        loop {
            let ended = entry.ended.notified();
            // Until the session must be retired, or a retry after a failure.
            let (up, wait) = match self.session(&t, &entry).await {
                Ok(Usable { not_after, .. }) => (
                    true,
                    not_after
                        .duration_since(self.clock.now())
                        .unwrap_or_default(),
                ),
                Err(f) => {
                    tracing::debug!(reason = f.reason.label(), detail = %f.detail, service = %t.name(), "pre-warming a session failed");
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
    }
}

/// Milliseconds since `started` (a pool's start): the clock of `Entry::last_used`.
fn millis_since(started: tokio::time::Instant) -> u64 {
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

/// Why a session handshake failed: the gateway's reset of the path stream, or the TLS reason.
fn session_failure(e: &std::io::Error) -> Refusal {
    match crate::tunnel::quic::reset_code(e) {
        Some(c) => reset_reason(c),
        None => mesh::failure_reason(e),
    }
}

/// The reason of a gateway's stream reset code ([`crate::tunnel::code`]), labelled as
/// `code::label` labels it.
fn reset_reason(code: u32) -> Refusal {
    use crate::tunnel::code;
    match code {
        code::BAD_HEADER => Refusal::BadHeader,
        code::REFUSED => Refusal::RefusedByGateway,
        code::NO_ROUTE => Refusal::NoRoute,
        code::UNREACHABLE => Refusal::Unreachable,
        code::BROKEN => Refusal::Broken,
        _ => Refusal::Reset,
    }
}
