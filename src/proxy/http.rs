//! L7 enforcement on ports the policy declares HTTP: the inbound sidecar parses HTTP/1.1 and
//! HTTP/2 (hyper), decides each request on method and normalised path, and forwards to the app
//! exactly the path it decided on. A denied request gets a neutral `403` (the rule is named in
//! the audit log and metrics, never to the caller); a request no rule can decide on safely (a
//! path that does not normalise, an odd request target or Host) gets `400`. The connection is
//! kept for the requests that follow.
//!
//! How requests are read, as a strict HTTP server does (RFC 9110, 9112, 9113):
//! - The request target is origin form (`/path?query`), absolute form (`http://host/path`, its
//!   host taken as the Host) or `*` with `OPTIONS`; anything else (`CONNECT`'s authority form, a
//!   path not starting with `/`, user info in the authority) is refused.
//! - Exactly one valid `Host` header, or an authority from the target; when both are present
//!   they must name the same host.
//! - The path is normalised ([`crate::policy::path`]) before the rules see it; the query is
//!   neither decided on nor changed, and is forwarded byte for byte.
//! - Methods are tokens (hyper refuses others); allows match them case-sensitively.
//! - A caller has `handshake_timeout` to send each request head (for HTTP/1.1 also counted
//!   while a keep-alive connection is idle); HTTP/2 peers must answer pings.
//!
//! JWT-SVIDs, only for a service some rule of which has `jwt` (others pay nothing): the token
//! is exactly one `Authorization` header with the `Bearer` scheme (case-insensitive, RFC 6750
//! §2.1), validated once per request against the sidecar's JWT bundles for one of the
//! audiences the rules name ([`Authz::check_jwt`]). Two `Authorization` headers are no token
//! (which one would the app read?). Unless the service sets `jwt_forward = true`, the header is
//! removed before the request is forwarded when it holds a Bearer token (valid or not), as
//! Istio does by default: the app gets the request the sidecar decided on, not a credential it
//! might replay; other schemes (`Basic`) are the app's and are left alone. Allows are audited
//! once per connection and again whenever the token's subject or region changes.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::authz::{Authz, Caller};
use crate::policy::eval::Http;
use crate::policy::path::{normalise, PathError, PathOptions};
use crate::policy::{JwtFacts, Outcome};
use crate::region::Region;

type Body = BoxBody<Bytes, hyper::Error>;
type Upstream = hyper::client::conn::http1::SendRequest<Incoming>;

/// Largest request head (HTTP/1 read buffer, HTTP/2 header list).
const MAX_HEAD: usize = 64 * 1024;
/// HTTP/2: streams one connection may have open at once.
const MAX_STREAMS: u32 = 100;
/// HTTP/2: how often an idle peer is pinged, and how long it has to answer.
const PING: Duration = Duration::from_secs(20);

/// The caller of one connection, owned.
pub(super) struct Peer {
    pub id: String,
    pub serial: String,
    pub region: Option<Region>,
    pub port: u16,
}

struct Conn {
    authz: Arc<Authz>,
    peer: Peer,
    app: SocketAddr,
    /// Idle HTTP/1 connections to the app (HTTP/2 callers may send requests concurrently).
    pool: Mutex<Vec<Upstream>>,
    /// Allows are audited once per connection.
    allow_logged: AtomicBool,
    /// A first request head has arrived (see [`HeadDeadline`]).
    started: AtomicBool,
    /// The token facts of the last allow audited on this connection.
    jwt_logged: Mutex<Option<JwtFacts>>,
}

/// Why a request was refused before any rule saw it.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error("request path: {0}")]
    Path(#[from] PathError),
    #[error("request target: only `/path`, `http://host/path` or `OPTIONS *` are served")]
    Target,
    #[error("request target: user info in the authority")]
    UserInfo,
    #[error("Host: exactly one valid Host header (or an absolute-form target) is required")]
    Host,
    #[error("Host: the Host header and the request target name different hosts")]
    HostMismatch,
}

/// What a request is decided on and forwarded with.
struct Target<'r> {
    /// Normalised path, or `*`.
    path: Cow<'r, str>,
    /// The host the request is for, when the target carried one (absolute form, HTTP/2).
    authority: Option<&'r str>,
}

/// Reads the request target and Host as a strict server does, and normalises the path.
fn target<'r>(req: &'r Request<Incoming>, opts: &PathOptions) -> Result<Target<'r>, BadRequest> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        return Err(BadRequest::Target);
    }
    let authority = match (uri.scheme_str(), uri.authority()) {
        (None, None) => None,
        (Some("http" | "https"), Some(a)) if a.as_str().contains('@') => {
            return Err(BadRequest::UserInfo)
        }
        (Some("http" | "https"), Some(a)) => Some(a.as_str()),
        _ => return Err(BadRequest::Target),
    };
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(BadRequest::Host),
        (Some(h), None) => {
            let h = h.to_str().map_err(|_| BadRequest::Host)?;
            match h.parse::<hyper::http::uri::Authority>() {
                Ok(parsed) if parsed.as_str() == h && !h.contains('@') => {}
                _ => return Err(BadRequest::Host),
            }
            if authority.is_some_and(|a| !a.eq_ignore_ascii_case(h)) {
                return Err(BadRequest::HostMismatch);
            }
        }
        (None, _) if authority.is_none() => return Err(BadRequest::Host),
        (None, _) => {}
    }
    let path = uri.path();
    if path == "*" {
        return match (req.method(), uri.query()) {
            (&Method::OPTIONS, None) => Ok(Target {
                path: Cow::Borrowed(path),
                authority,
            }),
            _ => Err(BadRequest::Target),
        };
    }
    Ok(Target {
        path: normalise(path, opts)?,
        authority,
    })
}

/// A response with a short plain-text body.
fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// `400` saying what is wrong with the caller's own request (it names no rule).
fn bad_request(why: &BadRequest) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("bad request: {why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r
}

/// Why no connection to the app could be had for a request.
#[derive(Debug, thiserror::Error)]
enum AppUnreachable {
    #[error("app {app}: {source}")]
    Connect {
        app: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Handshake(#[from] hyper::Error),
}

impl Conn {
    async fn upstream(&self) -> Result<Upstream, AppUnreachable> {
        loop {
            let idle = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(s) if s.is_ready() => return Ok(s),
                Some(_) => continue, // closed or busy: drop it
                None => break,
            }
        }
        let tcp = TcpStream::connect(self.app)
            .await
            .map_err(|source| AppUnreachable::Connect {
                app: self.app,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(
            async move {
                let _ = conn.await;
            }
            .in_current_span(),
        );
        Ok(send)
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, hyper::Error> {
        self.started.store(true, Ordering::Relaxed);
        let caller = Caller {
            peer: &self.peer.id,
            serial: &self.peer.serial,
            region: self.peer.region.as_deref(),
            port: self.peer.port,
        };
        // One policy for the whole request: the token is read for the rules that decide it.
        let policy = self.authz.policy();
        let svc = policy.service(&self.authz.service);
        let opts = svc.map(|s| s.paths).unwrap_or_default();
        let method = req.method().as_str().to_string();
        let (path, authority) = match target(&req, &opts) {
            Ok(t) => (t.path.into_owned(), t.authority.map(str::to_string)),
            Err(why) => return Ok(self.refuse(&caller, &method, req.uri().path(), &why)),
        };
        let jwt = match svc {
            Some(s) if s.reads_jwt() => {
                let facts = self.authz.check_jwt(s, super::jwt::bearer(req.headers()));
                if !s.jwt_forward {
                    super::jwt::strip_bearer(req.headers_mut());
                }
                Some(facts)
            }
            _ => None,
        };
        let first = !self.allow_logged.swap(true, Ordering::Relaxed);
        let new_token = jwt.as_ref().is_some_and(|j| self.new_token(j));
        let http = Http {
            method: &method,
            path: &path,
        };
        let (outcome, rule) = self.authz.decide_on(
            &policy,
            &caller,
            Some(http),
            jwt.as_ref(),
            first || new_token,
        );
        if outcome == Outcome::Deny {
            self.allow_logged.store(!first, Ordering::Relaxed);
            tracing::info!(peer_id = %self.peer.id, %method, %path, %rule, "request denied");
            return Ok(text(StatusCode::FORBIDDEN, "forbidden\n"));
        }
        if new_token {
            *self.jwt_logged.lock().unwrap_or_else(|e| e.into_inner()) = jwt;
        }
        if let Err(e) = origin_form(&mut req, &path, authority.as_deref()) {
            tracing::warn!(error = %e, %path, "cannot forward the normalised target");
            return Ok(text(StatusCode::BAD_REQUEST, "bad request\n"));
        }
        let mut up = match self.upstream().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "app unreachable");
                return Ok(text(StatusCode::BAD_GATEWAY, "app unreachable\n"));
            }
        };
        let resp = match up.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "request to the app failed");
                return Ok(text(StatusCode::BAD_GATEWAY, "app request failed\n"));
            }
        };
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(up);
        Ok(resp.map(|b| b.boxed()))
    }
}

impl Conn {
    /// Whether `jwt` differs from the token facts of the last allow audited on this
    /// connection (a new subject or region is audited even on a connection already logged).
    fn new_token(&self, jwt: &JwtFacts) -> bool {
        self.jwt_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            != Some(jwt)
    }

    /// `400` for a request no rule can decide on safely; counted and audited with the raw path.
    fn refuse(&self, c: &Caller<'_>, method: &str, raw: &str, why: &BadRequest) -> Response<Body> {
        tracing::info!(peer_id = %self.peer.id, %method, path = ?raw, error = %why, "request refused");
        let http = Http { method, path: raw };
        self.authz.refuse_request(c, http, &why.to_string());
        bad_request(why)
    }
}

/// Rewrites `req` as the HTTP/1.1 request the app gets: origin form with the decided `path`
/// and the query as received, and the target's host (if it had one) as `Host`.
fn origin_form(
    req: &mut Request<Incoming>,
    path: &str,
    authority: Option<&str>,
) -> Result<(), hyper::http::Error> {
    let pq = match req.uri().path_and_query() {
        // Already what was decided on: no copy.
        Some(pq) if pq.path() == path => pq.clone(),
        Some(pq) => match pq.query() {
            Some(q) => format!("{path}?{q}").try_into()?,
            None => path.to_string().try_into()?,
        },
        None => path.to_string().try_into()?,
    };
    *req.uri_mut() = pq.into();
    *req.version_mut() = hyper::Version::HTTP_11;
    if let Some(a) = authority {
        req.headers_mut()
            .insert(HOST, hyper::header::HeaderValue::from_str(a)?);
    }
    Ok(())
}

/// Closes a connection whose first request head has not arrived within the limit. hyper's own
/// head timer starts only once it knows the protocol, and telling HTTP/1 from HTTP/2 waits for
/// the first bytes, without a limit.
struct HeadDeadline<S> {
    io: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if r.is_pending() {
            if this.conn.started.load(Ordering::Relaxed) {
                this.deadline = None;
            } else if let Some(d) = &mut this.deadline {
                if d.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request head in time",
                    )));
                }
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves HTTP on an authenticated mesh connection until it ends. The caller has `head` to
/// send each request head.
pub(super) async fn serve<S>(io: S, authz: Arc<Authz>, peer: Peer, app: SocketAddr, head: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        authz,
        peer,
        app,
        pool: Mutex::new(Vec::new()),
        allow_logged: AtomicBool::new(false),
        started: AtomicBool::new(false),
        jwt_logged: Mutex::new(None),
    });
    let io = HeadDeadline {
        io,
        deadline: Some(Box::pin(tokio::time::sleep(head))),
        conn: conn.clone(),
    };
    let served = conn.clone();
    let svc = hyper::service::service_fn(move |req| served.clone().handle(req));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper silently ignores its header timeout.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(PING)
        .keep_alive_timeout(PING)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEAD as u32);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        match e.downcast_ref::<hyper::Error>() {
            // hyper answered 400 (or 431) itself: no request reached `handle` to be counted.
            Some(h) if h.is_parse() || h.is_parse_too_large() => conn.refuse_unparsed(h),
            _ => tracing::debug!(error = %e, "HTTP connection ended with error"),
        }
    }
}

impl Conn {
    /// Counts and audits a request hyper could not parse, as a deny by `bad-request` (method
    /// and path `-`: there were none to read).
    fn refuse_unparsed(&self, e: &hyper::Error) {
        let caller = Caller {
            peer: &self.peer.id,
            serial: &self.peer.serial,
            region: self.peer.region.as_deref(),
            port: self.peer.port,
        };
        tracing::info!(peer_id = %self.peer.id, error = %e, "unparseable HTTP request refused");
        let http = Http {
            method: "-",
            path: "-",
        };
        let why = format!("unparseable HTTP request: {e}");
        self.authz.refuse_request(&caller, http, &why);
    }
}
