//! The answering half of a session: the HTTP/2 server over an authenticated mTLS connection,
//! with its budgets ([`super::limits`]); each `CONNECT` stream is re-checked (certificate still
//! valid, not revoked) and admitted like a connection before it reaches the app.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::limits::{KeepAlive, SessionCounts, CLOSE_GRACE};
use super::reauth::{self, Exporter, Proof, Refused, Role, REAUTH_PATH};
use super::H2Stream;
use crate::identity::Serial;
use crate::proxy::inbound::{Inbound, DIR};
use crate::proxy::live::{PeerCert, Registration, SharedPeer};
use crate::refusal::Refusal;
use crate::tls::mesh;

type Conn<S> = h2::server::Connection<S, bytes::Bytes>;

/// A multiplexed session from another sidecar (see [`crate::tunnel`]): each HTTP/2 `CONNECT`
/// stream is one application connection, decided on its own like a connection. When the
/// sidecar drains, the session refuses new streams (GOAWAY) and ends with its last stream.
///
/// Bounded ([`crate::proxy::config::SessionLimits`]): sessions per caller ID and in total,
/// streams per session, header list size, an idle timeout (no open stream), a keep-alive PING,
/// and a churn budget (refused streams, streams the caller resets) past which the session is
/// closed with `ENHANCE_YOUR_CALM`.
pub(crate) async fn serve_session<S>(
    io: S,
    caller: Arc<PeerCert>,
    exporter: Option<Exporter>,
    target: SocketAddr,
    inbound: Arc<Inbound>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Callers the policy can never admit were refused before this (`could_admit`).
    let _place = match inbound.session_gate.enter(&caller.info.id) {
        Ok(p) => p,
        Err(reason) => {
            inbound.common.metrics.fail(DIR, reason);
            return;
        }
    };
    let Some(mut conn) = open_session(io, &inbound).await else {
        return;
    };
    tracing::debug!(peer_id = %caller.info.id, peer_region = ?caller.region, "session established");
    // The whole session (and every stream on it) ends when its certificate no longer passes;
    // re-authentication replaces that certificate for the session and its streams at once.
    let caller = PeerCert::shared(caller);
    let reg = inbound
        .common
        .live
        .register(DIR, caller.clone(), target.port(), None);
    let mut session = Session {
        keepalive: KeepAlive::new(conn.ping_pong()),
        conn,
        caller,
        target,
        counts: Arc::new(SessionCounts::default()),
        reauth: Arc::new(ReauthState {
            exporter,
            busy: AtomicBool::new(false),
            unchanged: AtomicU32::new(0),
            ours: Mutex::new(None),
        }),
        streams: tokio::task::JoinSet::new(),
        next_stream: AtomicU64::new(1),
        idle_since: Instant::now(),
        closing: None,
        refusing: false,
        goaway_sent: false,
        inbound,
    };
    session.run(reg).await;
}

/// One inbound session while it runs.
struct Session<S> {
    conn: Conn<S>,
    caller: SharedPeer,
    target: SocketAddr,
    inbound: Arc<Inbound>,
    counts: Arc<SessionCounts>,
    reauth: Arc<ReauthState>,
    streams: tokio::task::JoinSet<()>,
    next_stream: AtomicU64,
    keepalive: KeepAlive,
    /// Since when no stream is open.
    idle_since: Instant,
    /// Set when the session was told to go away (idle, over budget): the latest it may end
    /// once its streams are done (an idle close lets streams already in flight finish).
    closing: Option<Instant>,
    /// Over budget: new streams are refused at once.
    refusing: bool,
    goaway_sent: bool,
}

impl<S> Session<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    /// Serves streams until the session ends, is closed, or its registration is swept.
    async fn run(&mut self, mut reg: Registration) {
        let m = &self.inbound.common.metrics.clone();
        let limits = self.inbound.sessions;
        let mut draining = self.inbound.common.draining.clone();
        loop {
            let idle_at = self.idle_since + limits.idle_timeout;
            let close_at = self.closing.unwrap_or(idle_at);
            tokio::select! {
                r = draining.wait_for(|d| *d), if !self.goaway_sent => {
                    self.goaway_sent = true;
                    if r.is_ok() {
                        self.conn.graceful_shutdown();
                    }
                }
                r = self.conn.accept() => match r {
                    Some(Ok((req, respond))) => self.accept(req, respond),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "session ended with an error");
                        break;
                    }
                    None => break,
                },
                Some(_) = self.streams.join_next(), if !self.streams.is_empty() => {
                    if self.streams.is_empty() {
                        self.idle_since = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(idle_at), if self.streams.is_empty() && self.closing.is_none() && !self.goaway_sent => {
                    tracing::debug!(peer_id = %self.caller.load().info.id, idle = ?limits.idle_timeout, "idle session closing");
                    self.conn.graceful_shutdown();
                    self.closing = Some(Instant::now() + CLOSE_GRACE);
                }
                _ = tokio::time::sleep_until(close_at), if self.closing.is_some() && (self.refusing || self.streams.is_empty()) => break,
                reason = reg.closed() => {
                    m.closed_live(DIR, reason);
                    break;
                }
                _ = self.keepalive.dead() => {
                    let reason = Refusal::SessionKeepaliveTimeout;
                    m.fail(DIR, reason);
                    tracing::warn!(reason = reason.label(), peer_id = %self.caller.load().info.id, "session closed: a PING went unanswered");
                    break;
                }
            }
            self.check_budget();
        }
    }

    /// A new stream: refused at once when over budget, else decided and carried in a task of
    /// its own.
    fn accept(
        &mut self,
        req: hyper::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
    ) {
        if self.refusing {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            return;
        }
        let n = self.next_stream.fetch_add(1, Ordering::Relaxed);
        if req.method() == hyper::Method::POST && req.uri().path() == REAUTH_PATH {
            let span = tracing::info_span!("reauth", n);
            let task = reauthenticate(
                req,
                respond,
                self.caller.clone(),
                self.inbound.clone(),
                self.reauth.clone(),
                self.counts.clone(),
            );
            self.streams.spawn(task.instrument(span));
            return;
        }
        // A child of the session's connection span.
        let span = tracing::info_span!("stream", n);
        let stream = session_stream(
            req,
            respond,
            self.caller.clone(),
            self.target,
            self.inbound.clone(),
            self.counts.clone(),
        );
        self.streams.spawn(stream.instrument(span));
    }

    /// Closes the session once it is over its churn budget (refused or reset streams).
    fn check_budget(&mut self) {
        if self.refusing {
            return;
        }
        if let Some(reason) = self.counts.over_budget(&self.inbound.sessions) {
            self.inbound.common.metrics.fail(DIR, reason);
            let caller = self.caller.load();
            tracing::warn!(reason = reason.label(), peer_id = %caller.info.id, serial = %caller.info.serial, "session closed: over its churn budget (refused or reset streams)");
            self.conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            self.refusing = true;
            self.closing = Some(Instant::now() + CLOSE_GRACE);
        }
    }
}

/// The HTTP/2 server half of a session, with its limits set on purpose (h2's defaults allow a
/// 16 MiB header list); `None` when the preface fails or does not come in time (counted).
async fn open_session<S>(io: S, inbound: &Inbound) -> Option<Conn<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use super::limits::{MAX_HEADER_LIST, MAX_LOCAL_RESETS, PREFACE_TIMEOUT};
    use super::{MAX_FRAME, SESSION_WINDOW, STREAM_WINDOW};
    let m = &inbound.common.metrics;
    let handshake = h2::server::Builder::new()
        .max_frame_size(MAX_FRAME)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(SESSION_WINDOW)
        .max_concurrent_streams(inbound.sessions.max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .handshake::<_, bytes::Bytes>(io);
    match tokio::time::timeout(PREFACE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            let reason = Refusal::SessionFailed;
            m.fail(DIR, reason);
            tracing::warn!(reason = reason.label(), error = %e, "session preface failed");
            None
        }
        Err(_) => {
            let reason = Refusal::SessionPrefaceTimeout;
            m.fail(DIR, reason);
            tracing::warn!(
                reason = reason.label(),
                "no session preface within {PREFACE_TIMEOUT:?}"
            );
            None
        }
    }
}

/// One stream of a session, counted into its session's budget.
async fn session_stream(
    req: hyper::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<bytes::Bytes>,
    caller: SharedPeer,
    target: SocketAddr,
    inbound: Arc<Inbound>,
    counts: Arc<SessionCounts>,
) {
    if !carry_stream(req, respond, &caller, target, &inbound, &counts).await {
        counts.denied.fetch_add(1, Ordering::Relaxed);
    }
    counts.ended.fetch_add(1, Ordering::Relaxed);
}

/// Decides one stream and carries it; false when it was refused.
async fn carry_stream(
    req: hyper::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    caller: &SharedPeer,
    target: SocketAddr,
    inbound: &Inbound,
    counts: &SessionCounts,
) -> bool {
    let common = &inbound.common;
    let answer = |status: u16| {
        hyper::Response::builder()
            .status(status)
            .body(())
            .expect("a valid response")
    };
    if req.method() != hyper::Method::CONNECT {
        common.metrics.fail(DIR, Refusal::BadSessionRequest);
        let _ = respond.send_response(answer(405), true);
        return false;
    }
    // The session's certificate (the handshake's, or a newer one it re-authenticated with) must
    // still hold for each new stream.
    let cert = caller.load();
    let expired = common.clock.now() >= cert.info.not_after;
    let revoked = common.identity.revoked.load().contains(&cert.info.serial);
    if expired || revoked {
        let reason = if expired {
            Refusal::ExpiredCertificate
        } else {
            Refusal::Revoked
        };
        common.metrics.fail(DIR, reason);
        tracing::warn!(reason = reason.label(), peer_id = %cert.info.id, serial = %cert.info.serial, "session stream refused: the session's certificate no longer passes");
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return false;
    }
    let Some((verdict, reg)) = inbound.admit(caller, target.port()) else {
        let _ = respond.send_response(answer(403), true);
        return false;
    };
    let send = match respond.send_response(answer(200), false) {
        Ok(s) => s,
        Err(e) => {
            // Reset by the caller before the answer: churn, counted like any other reset.
            counts.resets.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "session stream closed before the answer");
            return true;
        }
    };
    let io = H2Stream::server(send, req.into_body()).count_resets(counts.resets.clone());
    inbound.carry(io, verdict, reg, target).await;
    true
}

/// The answering side's re-authentication state of one session.
struct ReauthState {
    /// The session's TLS exporter value (`None`: the session cannot be re-authenticated).
    exporter: Option<Exporter>,
    /// One re-authentication at a time.
    busy: AtomicBool,
    /// Re-authentications in a row that changed neither certificate.
    unchanged: AtomicU32,
    /// The serial of the SVID we last proved (`None`: only the handshake's).
    ours: Mutex<Option<Serial>>,
}

/// How long a caller may take to send its proof.
const REAUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Re-authentications in a row that change no certificate before they are refused: a caller
/// re-authenticates on its rotations and before a certificate expires, so a few per lifetime.
const MAX_UNCHANGED: u32 = 8;

/// One re-authentication stream (see [`reauth`]): the caller's proof verified, the session's
/// certificate replaced, our proof sent back; else refused, counted into the session's churn
/// budget, and the session's limits unchanged.
async fn reauthenticate(
    req: hyper::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    caller: SharedPeer,
    inbound: Arc<Inbound>,
    state: Arc<ReauthState>,
    counts: Arc<SessionCounts>,
) {
    let common = &inbound.common;
    let outcome = if state.busy.swap(true, Ordering::AcqRel) {
        Err(Refused {
            reason: Refusal::ReauthBudget,
            detail: "a re-authentication of this session is already in flight".into(),
        })
    } else {
        let checked = tokio::time::timeout(
            REAUTH_TIMEOUT,
            verify_caller(req.into_body(), &caller, &inbound, &state),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Refused {
                reason: Refusal::ReauthTimeout,
                detail: format!("no whole proof within {REAUTH_TIMEOUT:?}"),
            })
        })
        .and_then(|new| {
            let (ours, serial) = our_proof(&inbound, &state)?;
            within_budget(&state, &caller.load(), &new, serial)?;
            Ok((new, ours))
        });
        state.busy.store(false, Ordering::Release);
        checked
    };
    let answer = |status: u16| {
        hyper::Response::builder()
            .status(status)
            .body(())
            .expect("a valid response")
    };
    match outcome {
        Ok((new, ours)) => {
            let old = caller.load_full();
            tracing::info!(peer_id = %new.info.id, old_serial = %old.info.serial, serial = %new.info.serial, not_after = ?new.info.not_after, "session re-authenticated");
            let not_after = new.info.not_after;
            caller.store(Arc::new(new));
            common.live.moved(not_after);
            if let Ok(mut send) = respond.send_response(answer(200), false) {
                let _ = send.send_data(ours.into(), true);
            }
        }
        Err(r) => {
            counts.denied.fetch_add(1, Ordering::Relaxed);
            common.metrics.fail(DIR, r.reason);
            let cert = caller.load();
            tracing::warn!(reason = r.reason.label(), detail = %r.detail, peer_id = %cert.info.id, serial = %cert.info.serial, "session re-authentication refused: the session keeps its certificate's expiry");
            let status = if r.reason == Refusal::ReauthMalformed {
                400
            } else {
                403
            };
            let _ = respond.send_response(answer(status), true);
        }
    }
    counts.ended.fetch_add(1, Ordering::Relaxed);
}

/// The caller's proof, verified as a handshake verifies a client (chain, profile, trust
/// domain, revocation, validity now), for the session's SPIFFE ID and region, signed by the new
/// leaf's key over this session's exporter.
async fn verify_caller(
    body: h2::RecvStream,
    caller: &SharedPeer,
    inbound: &Inbound,
    state: &ReauthState,
) -> Result<PeerCert, Refused> {
    let exporter = state.exporter.ok_or_else(|| Refused {
        reason: Refusal::ReauthMalformed,
        detail: "the session has no exporter value".into(),
    })?;
    let proof = Proof::decode(&reauth::read_body(body).await?)?;
    let (leaf, rest) = proof.chain.split_first().ok_or_else(|| Refused {
        reason: Refusal::ReauthMalformed,
        detail: "no certificate".into(),
    })?;
    let common = &inbound.common;
    let now = reauth::unix(common.clock.now());
    use rustls::server::danger::ClientCertVerifier;
    inbound
        .client_verifier
        .verify_client_cert(leaf, rest, now)
        .map_err(|e| Refused {
            reason: mesh::tls_reason(&e),
            detail: e.to_string(),
        })?;
    let cur = caller.load();
    if common.identity.revoked.load().contains(&cur.info.serial) {
        return Err(Refused {
            reason: Refusal::Revoked,
            detail: format!("the session's certificate {} is revoked", cur.info.serial),
        });
    }
    let (info, region) = proof.accept(
        Role::Client,
        &exporter,
        &cur.info.id,
        cur.region.as_ref(),
        common.identity.id().trust_domain(),
    )?;
    Ok(PeerCert { info, region })
}

/// Our proof for this session, with the SVID handshakes present now; refused once too many
/// re-authentications in a row changed no certificate.
fn our_proof(inbound: &Inbound, state: &ReauthState) -> Result<(Vec<u8>, Serial), Refused> {
    let exporter = state.exporter.ok_or_else(|| Refused {
        reason: Refusal::ReauthMalformed,
        detail: "the session has no exporter value".into(),
    })?;
    let key = inbound
        .common
        .identity
        .resolver
        .0
        .load_full()
        .ok_or_else(|| Refused {
            reason: Refusal::NotReady,
            detail: "no SVID".into(),
        })?;
    let proof = reauth::sign(&key, Role::Server, &exporter)?;
    let serial = key
        .end_entity_cert()
        .ok()
        .and_then(|c| crate::identity::inspect_cert(c).ok())
        .map(|i| i.serial)
        .ok_or_else(|| Refused {
            reason: Refusal::NotReady,
            detail: "our SVID does not parse".into(),
        })?;
    Ok((proof.encode(), serial))
}

/// Refuses the re-authentication when it is the [`MAX_UNCHANGED`]th in a row that changes
/// neither the caller's certificate nor ours: re-authentication is not a free ping.
fn within_budget(
    state: &ReauthState,
    old: &PeerCert,
    new: &PeerCert,
    ours: Serial,
) -> Result<(), Refused> {
    let mut last = state.ours.lock().unwrap_or_else(|e| e.into_inner());
    let changed = new.info.serial != old.info.serial || last.as_ref() != Some(&ours);
    *last = Some(ours);
    if changed {
        state.unchanged.store(0, Ordering::Relaxed);
        return Ok(());
    }
    if state.unchanged.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_UNCHANGED {
        return Err(Refused {
            reason: Refusal::ReauthBudget,
            detail: format!("{MAX_UNCHANGED} re-authentications in a row changed no certificate"),
        });
    }
    Ok(())
}
