//! Copying both ways between two byte streams (app and peer, or the two legs of a gateway).
//!
//! One future polls both directions (no split halves, no lock). Copy buffers come from a small
//! per-thread pool and are held only while bytes move: a read that would block hands its buffer
//! back, so an idle connection holds no copy buffer at all, however many there are.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of one copy buffer: two TLS records, so a bulk read fills whole records.
const BUF: usize = 32 * 1024;
/// Buffers kept per thread for the next reads (at most 512 KiB).
const POOLED: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    /// Buffers this thread allocated (the pool was empty), for tests.
    static ALLOCATED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn take() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| {
        ALLOCATED.with(|a| a.set(a.get() + 1));
        vec![0u8; BUF].into_boxed_slice()
    })
}

fn give(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOLED {
            p.push(buf);
        }
    });
}

/// Bytes read but not yet written on.
struct Held {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

#[derive(Default)]
struct Direction {
    held: Option<Held>,
    /// EOF was read: the write side is being shut down.
    eof: bool,
    done: bool,
    total: u64,
}

impl Direction {
    /// Reads and writes until `from` has nothing now (or is at EOF and `to` is shut).
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if let Some(h) = &mut self.held {
                while h.pos < h.end {
                    let n = ready!(Pin::new(&mut *to).poll_write(cx, &h.buf[h.pos..h.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    h.pos += n;
                    self.total += n as u64;
                }
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                if let Some(h) = self.held.take() {
                    give(h.buf);
                }
            }
            let mut buf = take();
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let end = rb.filled().len();
                    if end == 0 {
                        give(buf);
                        self.eof = true;
                    } else {
                        self.held = Some(Held { buf, pos: 0, end });
                    }
                }
                Poll::Ready(Err(e)) => {
                    give(buf);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    give(buf);
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies both ways until both sides are done (each EOF carried as a shutdown of the other
/// side's write half); returns (bytes app → peer, bytes peer → app). The first error ends both.
pub(crate) async fn splice<A, B>(app: &mut A, peer: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut to_peer = Direction::default();
    let mut to_app = Direction::default();
    std::future::poll_fn(|cx| {
        let a = to_peer.poll(cx, app, peer)?;
        let b = to_app.poll(cx, peer, app)?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok((to_peer.total, to_app.total)))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both directions at once, many buffers' worth each way, arrive intact, and each EOF
    /// shuts the other side's write half.
    #[tokio::test]
    async fn copies_both_ways_and_carries_eof() {
        let (mut app, app_end) = tokio::io::duplex(7 * 1024);
        let (mut peer, peer_end) = tokio::io::duplex(5 * 1024);
        let spliced = tokio::spawn(async move { splice(&mut app, &mut peer).await });
        let up: Vec<u8> = (0..BUF * 9 + 13).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..BUF * 5 + 1).map(|i| (i * 3 % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let (mut app_rd, mut app_wr) = tokio::io::split(app_end);
        let (mut peer_rd, mut peer_wr) = tokio::io::split(peer_end);
        let w1 = tokio::spawn(async move {
            app_wr.write_all(&up2).await.unwrap();
            app_wr.shutdown().await.unwrap();
        });
        let w2 = tokio::spawn(async move {
            peer_wr.write_all(&down2).await.unwrap();
            peer_wr.shutdown().await.unwrap();
        });
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        let (r1, r2) = tokio::join!(
            peer_rd.read_to_end(&mut got_up),
            app_rd.read_to_end(&mut got_down)
        );
        r1.unwrap();
        r2.unwrap();
        w1.await.unwrap();
        w2.await.unwrap();
        assert!(got_up == up, "app → peer bytes changed");
        assert!(got_down == down, "peer → app bytes changed");
        let counts = spliced.await.unwrap().unwrap();
        assert_eq!(counts, (up.len() as u64, down.len() as u64));
    }

    /// A hundred idle connections hold no copy buffer: the thread allocates one or two.
    #[tokio::test]
    async fn idle_connections_hold_no_buffer() {
        let before = ALLOCATED.with(|a| a.get());
        let mut ends = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (mut app, app_end) = tokio::io::duplex(1024);
            let (mut peer, peer_end) = tokio::io::duplex(1024);
            tasks.push(tokio::spawn(
                async move { splice(&mut app, &mut peer).await },
            ));
            ends.push((app_end, peer_end));
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let allocated = ALLOCATED.with(|a| a.get()) - before;
        assert!(
            allocated <= 2,
            "{allocated} buffers for 100 idle connections"
        );
        // And they still work: one byte through the first.
        let (app_end, peer_end) = &mut ends[0];
        app_end.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        peer_end.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
        drop(ends);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
}
