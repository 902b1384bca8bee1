//! The sidecar-to-sidecar session protocol: one mutual TLS 1.3 connection between two sidecars
//! (ALPN [`SESSION_ALPN`]) with HTTP/2 inside, each application connection one `CONNECT` stream.
//! Same-region sessions ride a direct TCP connection (`pooling`); cross-region ones ride a
//! gateway path of [`crate::tunnel`]. The calling half is [`pool`], the answering half
//! `server` (inbound), the answering side's budgets `limits`; [`H2Stream`] is a stream of
//! either half as `AsyncRead + AsyncWrite`.

pub(crate) mod limits;
pub mod pool;
pub mod reauth;
pub(super) mod server;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// ALPN of a sidecar-to-sidecar session.
pub const SESSION_ALPN: &[u8] = b"trustline-mux/1";

/// HTTP/2 flow-control windows of a session: sized for a WAN round trip.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const SESSION_WINDOW: u32 = 16 << 20;
/// Largest DATA frame a session end accepts: four TLS records, so bulk transfers cost fewer
/// frames (HTTP/2's default is 16 KiB).
pub const MAX_FRAME: u32 = 64 << 10;

/// The largest DATA frame payload written at once.
const MAX_CHUNK: usize = 64 * 1024;

enum Recv {
    /// Client side: the destination's answer has not come yet (the caller may already write).
    Pending(h2::client::ResponseFuture),
    Body(h2::RecvStream, Bytes),
    Done,
}

/// Both halves of one stream.
pub struct H2Stream {
    send: h2::SendStream<Bytes>,
    recv: Recv,
    shut: bool,
    /// Set once the peer's reset was counted (so a stream counts once).
    reset_seen: bool,
    /// Where the answering side counts streams the caller reset (its session's churn budget).
    resets: Option<Arc<AtomicU32>>,
    /// What the stream keeps alive while it is open (the calling side: its session's use).
    _holds: Option<Arc<dyn Send + Sync>>,
    /// The calling side's place in its session's count of open streams (see `pool`).
    _slot: Option<pool::StreamSlot>,
}

fn io_err(e: h2::Error) -> io::Error {
    if let Some(r) = e.reason() {
        if r == h2::Reason::REFUSED_STREAM {
            return io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "refused by the destination",
            );
        }
    }
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl H2Stream {
    /// The calling side, before the answer.
    pub(crate) fn client(
        send: h2::SendStream<Bytes>,
        response: h2::client::ResponseFuture,
        slot: pool::StreamSlot,
    ) -> Self {
        H2Stream {
            send,
            recv: Recv::Pending(response),
            shut: false,
            reset_seen: false,
            resets: None,
            _holds: None,
            _slot: Some(slot),
        }
    }

    /// The answering side.
    pub fn server(send: h2::SendStream<Bytes>, body: h2::RecvStream) -> Self {
        H2Stream {
            send,
            recv: Recv::Body(body, Bytes::new()),
            shut: false,
            reset_seen: false,
            resets: None,
            _holds: None,
            _slot: None,
        }
    }

    /// Keeps `token` alive as long as the stream.
    pub fn holding(mut self, token: Arc<dyn Send + Sync>) -> Self {
        self._holds = Some(token);
        self
    }

    /// Counts into `resets` when the peer resets this stream.
    pub fn count_resets(mut self, resets: Arc<AtomicU32>) -> Self {
        self.resets = Some(resets);
        self
    }

    /// `e` as an I/O error, counting it first if it is the peer's reset.
    fn fail(&mut self, e: h2::Error) -> io::Error {
        if e.is_reset() && e.is_remote() && !self.reset_seen {
            self.reset_seen = true;
            if let Some(c) = &self.resets {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        io_err(e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.recv {
                Recv::Pending(fut) => {
                    let resp = ready!(Pin::new(fut).poll(cx)).map_err(io_err)?;
                    if resp.status() != hyper::StatusCode::OK {
                        self.recv = Recv::Done;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("the destination answered {}", resp.status()),
                        )));
                    }
                    self.recv = Recv::Body(resp.into_body(), Bytes::new());
                }
                Recv::Body(body, buf) => {
                    if !buf.is_empty() {
                        let n = buf.len().min(out.remaining());
                        out.put_slice(&buf[..n]);
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => {
                            let _ = body.flow_control().release_capacity(data.len());
                            *buf = data;
                        }
                        Some(Err(e)) => {
                            if e.reason() == Some(h2::Reason::NO_ERROR) {
                                self.recv = Recv::Done;
                                return Poll::Ready(Ok(()));
                            }
                            return Poll::Ready(Err(self.fail(e)));
                        }
                        None => {
                            self.recv = Recv::Done;
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                Recv::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let cap = self.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len()).min(MAX_CHUNK);
                if let Err(e) = self
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    return Poll::Ready(Err(self.fail(e)));
                }
                return Poll::Ready(Ok(n));
            }
            self.send.reserve_capacity(buf.len().min(MAX_CHUNK));
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(self.fail(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the stream was closed",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.reserve_capacity(0);
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}
