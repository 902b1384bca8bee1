//! The answering half of a session: the HTTP/2 server over an authenticated mTLS connection,
//! with its budgets ([`super::limits`]); each `CONNECT` stream is re-checked (certificate still
//! valid, not revoked) and admitted like a connection before it reaches the app.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::limits::SessionCounts;
use super::H2Stream;
use crate::proxy::inbound::{admit, carry, DIR};
use crate::proxy::live::PeerCert;
use crate::proxy::Shared;

/// A multiplexed session from another sidecar (see [`crate::tunnel`]): each HTTP/2 `CONNECT`
/// stream is one application connection, decided on its own like a connection. When the
/// sidecar drains, the session refuses new streams (GOAWAY) and ends with its last stream.
///
/// Bounded ([`super::config::SessionLimits`]): sessions per caller ID and in total, streams per
/// session, header list size, an idle timeout (no open stream), a keep-alive PING, and a churn
/// budget (refused streams, streams the caller resets) past which the session is closed with
/// `ENHANCE_YOUR_CALM`.
pub(crate) async fn serve_session<S>(
    io: S,
    caller: Arc<PeerCert>,
    target: SocketAddr,
    shared: Arc<Shared>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use super::limits::{KeepAlive, SessionCounts, CLOSE_GRACE};
    use tokio::time::Instant;
    let m = &shared.metrics;
    let limits = shared
        .config
        .inbound
        .as_ref()
        .expect("inbound configured")
        .sessions;
    // Callers the policy can never admit were refused before this (`could_admit`).
    let _place = match shared.session_gate.enter(&caller.info.id) {
        Ok(p) => p,
        Err(reason) => {
            m.fail(DIR, reason);
            return;
        }
    };
    let Some(mut conn) = open_session(io, &limits, &shared).await else {
        return;
    };
    tracing::debug!(peer_id = %caller.info.id, peer_region = ?caller.region, "session established");
    // The whole session (and every stream on it) ends when its certificate no longer passes.
    let mut reg = shared
        .live
        .register(DIR, caller.clone(), target.port(), None);
    let counts = Arc::new(SessionCounts::default());
    let mut streams = tokio::task::JoinSet::new();
    let mut draining = shared.draining.clone();
    let mut goaway_sent = false;
    let mut keepalive = KeepAlive::new(conn.ping_pong());
    let mut idle_since = Instant::now();
    // Set when the session was told to go away (idle, over budget): the latest it may end once
    // its streams are done (an idle close lets streams already in flight finish).
    let mut closing: Option<Instant> = None;
    // Over budget: new streams are refused at once.
    let mut refusing = false;
    loop {
        let idle_at = idle_since + limits.idle_timeout;
        let close_at = closing.unwrap_or(idle_at);
        tokio::select! {
            r = draining.wait_for(|d| *d), if !goaway_sent => {
                goaway_sent = true;
                if r.is_ok() {
                    conn.graceful_shutdown();
                }
            }
            r = conn.accept() => match r {
                Some(Ok((req, mut respond))) => {
                    if refusing {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let stream = session_stream(req, respond, caller.clone(), target, shared.clone(), counts.clone());
                    streams.spawn(stream);
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "session ended with an error");
                    break;
                }
                None => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_since = Instant::now();
                }
            }
            _ = tokio::time::sleep_until(idle_at), if streams.is_empty() && closing.is_none() && !goaway_sent => {
                tracing::debug!(peer_id = %caller.info.id, idle = ?limits.idle_timeout, "idle session closing");
                conn.graceful_shutdown();
                closing = Some(Instant::now() + CLOSE_GRACE);
            }
            _ = tokio::time::sleep_until(close_at), if closing.is_some() && (refusing || streams.is_empty()) => break,
            reason = reg.closed() => {
                shared.metrics.closed_live(DIR, reason);
                break;
            }
            _ = keepalive.dead() => {
                m.fail(DIR, "session_keepalive_timeout");
                tracing::warn!(reason = "session_keepalive_timeout", peer_id = %caller.info.id, "session closed: a PING went unanswered");
                break;
            }
        }
        if !refusing {
            if let Some(reason) = counts.over_budget(&limits) {
                m.fail(DIR, reason);
                tracing::warn!(reason, peer_id = %caller.info.id, serial = %caller.info.serial, "session closed: over its churn budget (refused or reset streams)");
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                refusing = true;
                closing = Some(Instant::now() + CLOSE_GRACE);
            }
        }
    }
}

/// The HTTP/2 server half of a session, with its limits set on purpose (h2's defaults allow a
/// 16 MiB header list); `None` when the preface fails or does not come in time (counted).
async fn open_session<S>(
    io: S,
    limits: &crate::proxy::config::SessionLimits,
    shared: &Shared,
) -> Option<h2::server::Connection<S, bytes::Bytes>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use super::limits::{MAX_HEADER_LIST, MAX_LOCAL_RESETS, PREFACE_TIMEOUT};
    use super::{MAX_FRAME, SESSION_WINDOW, STREAM_WINDOW};
    let m = &shared.metrics;
    let handshake = h2::server::Builder::new()
        .max_frame_size(MAX_FRAME)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(SESSION_WINDOW)
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .handshake::<_, bytes::Bytes>(io);
    match tokio::time::timeout(PREFACE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            m.fail(DIR, "session_failed");
            tracing::warn!(reason = "session_failed", error = %e, "session preface failed");
            None
        }
        Err(_) => {
            m.fail(DIR, "session_preface_timeout");
            tracing::warn!(
                reason = "session_preface_timeout",
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
    caller: Arc<PeerCert>,
    target: SocketAddr,
    shared: Arc<Shared>,
    counts: Arc<SessionCounts>,
) {
    if !carry_stream(req, respond, &caller, target, &shared, &counts).await {
        counts.denied.fetch_add(1, Ordering::Relaxed);
    }
    counts.ended.fetch_add(1, Ordering::Relaxed);
}

/// Decides one stream and carries it; false when it was refused.
async fn carry_stream(
    req: hyper::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    caller: &Arc<PeerCert>,
    target: SocketAddr,
    shared: &Shared,
    counts: &SessionCounts,
) -> bool {
    let m = &shared.metrics;
    let answer = |status: u16| {
        hyper::Response::builder()
            .status(status)
            .body(())
            .expect("a valid response")
    };
    if req.method() != hyper::Method::CONNECT {
        m.fail(DIR, "bad_session_request");
        let _ = respond.send_response(answer(405), true);
        return false;
    }
    // The session was authenticated once; its certificate must still hold for each new stream.
    let expired = shared.clock.now() >= caller.info.not_after;
    let revoked = shared.identity.revoked.load().contains(&caller.info.serial);
    if expired || revoked {
        let reason = if expired {
            "expired_certificate"
        } else {
            "revoked"
        };
        m.fail(DIR, reason);
        tracing::warn!(reason, peer_id = %caller.info.id, serial = %caller.info.serial, "session stream refused: the session's certificate no longer passes");
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return false;
    }
    let Some((verdict, reg)) = admit(caller, target.port(), shared) else {
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
    carry(io, verdict, reg, target, shared).await;
    true
}
