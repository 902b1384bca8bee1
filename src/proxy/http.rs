//! L7 enforcement on ports the policy declares HTTP: the inbound sidecar parses HTTP/1.1 and
//! HTTP/2 (hyper), decides each request on method and path, answers a denied request with `403`
//! naming the rule, and keeps the connection for the requests that are allowed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::authz::{Authz, Caller};
use crate::policy::eval::Http;
use crate::policy::Outcome;

type Body = BoxBody<Bytes, hyper::Error>;
type Upstream = hyper::client::conn::http1::SendRequest<Incoming>;

/// The caller of one connection, owned.
pub(super) struct Peer {
    pub id: String,
    pub serial: String,
    pub region: Option<String>,
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
}

fn text(status: StatusCode, body: String, rule: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(rule) {
        r.headers_mut().insert("x-trustline-rule", v);
    }
    r
}

impl Conn {
    async fn upstream(&self) -> Result<Upstream, String> {
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
            .map_err(|e| format!("app {}: {e}", self.app))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, hyper::Error> {
        let caller = Caller {
            peer: &self.peer.id,
            serial: &self.peer.serial,
            region: self.peer.region.as_deref(),
            port: self.peer.port,
        };
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let first = !self.allow_logged.swap(true, Ordering::Relaxed);
        let (outcome, rule) = self.authz.decide(
            &caller,
            Some(Http {
                method: &method,
                path: &path,
            }),
            first,
        );
        if outcome == Outcome::Deny {
            self.allow_logged.store(!first, Ordering::Relaxed);
            tracing::info!(peer_id = %self.peer.id, %method, %path, %rule, "request denied");
            let body = format!(
                "denied by rule {rule:?} of service {}\n",
                self.authz.service
            );
            return Ok(text(StatusCode::FORBIDDEN, body, &rule));
        }
        // Forward as HTTP/1.1 in origin form.
        let authority = req.uri().authority().map(|a| a.to_string());
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = pq.into();
        }
        *req.version_mut() = hyper::Version::HTTP_11;
        if let (Some(a), false) = (authority, req.headers().contains_key(hyper::header::HOST)) {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&a) {
                req.headers_mut().insert(hyper::header::HOST, v);
            }
        }
        let mut up = match self.upstream().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "app unreachable");
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    "app unreachable\n".into(),
                    "app_unreachable",
                ));
            }
        };
        let resp = match up.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "request to the app failed");
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    "app request failed\n".into(),
                    "app_error",
                ));
            }
        };
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(up);
        Ok(resp.map(|b| b.boxed()))
    }
}

/// Serves HTTP on an authenticated mesh connection until it ends or `closed` fires.
pub(super) async fn serve<S>(io: S, authz: Arc<Authz>, peer: Peer, app: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        authz,
        peer,
        app,
        pool: Mutex::new(Vec::new()),
        allow_logged: AtomicBool::new(false),
    });
    let svc = hyper::service::service_fn(move |req| conn.clone().handle(req));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "HTTP connection ended with error");
    }
}
