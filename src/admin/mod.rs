//! The plain-HTTP admin listener every role exposes on a local address: `/metrics`
//! (Prometheus text format), `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Longest wait for a request's headers (and, between requests, an idle connection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A role-specific JSON endpoint: returns the body.
pub type JsonRoute = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Why a role is not ready: the reason `/readyz` shows after `not ready: `.
#[derive(Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// No SVID has been obtained yet.
    #[error("no SVID yet")]
    NoSvid,
    /// The SVID held has expired and no successor came in time.
    #[error("SVID expired")]
    SvidExpired,
}

/// Shows the reason's text, as the `String` readiness hooks used to (diagnostics print
/// `{:?}` of a readiness result).
impl std::fmt::Debug for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.to_string(), f)
    }
}

/// A role's readiness check: `Ok` when ready, or why not.
pub type ReadyCheck = Box<dyn Fn() -> Result<(), NotReady> + Send + Sync>;

/// What the admin endpoints read.
pub struct AdminState {
    /// The metrics registry of the role.
    pub registry: Registry,
    /// Readiness: `Ok` when ready, or why not.
    pub ready: ReadyCheck,
    /// Extra JSON endpoints by path (e.g. `/identity`).
    pub json: Vec<(&'static str, JsonRoute)>,
}

/// Binds the admin listener and serves it until `shutdown` changes.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed; pausing");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&state, req)) }
                });
                // hyper ignores `header_read_timeout` without a timer.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn handle(state: &AdminState, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
            }
            let mut r = text(StatusCode::OK, out);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match (state.ready)() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        path => match state.json.iter().find(|(p, _)| *p == path) {
            Some((_, route)) => {
                let mut r = text(StatusCode::OK, format!("{}\n", route()));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                r
            }
            None => text(StatusCode::NOT_FOUND, "not found\n".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::NotReady;

    /// `/readyz` shows these after `not ready: `; `{:?}` of a readiness result shows them too.
    #[test]
    fn not_ready_reasons_keep_their_texts() {
        assert_eq!(NotReady::NoSvid.to_string(), "no SVID yet");
        assert_eq!(NotReady::SvidExpired.to_string(), "SVID expired");
        let r: Result<(), NotReady> = Err(NotReady::NoSvid);
        assert_eq!(format!("{r:?}"), "Err(\"no SVID yet\")");
    }
}
