//! The TCP side of the relay: per connection, per direction, a reader task that stamps each chunk
//! with its release time and a writer task that waits for it. The reader never sleeps, so the
//! delay adds latency without capping throughput.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tracing::Instrument;

use super::{Counters, Dir, RelayHandle, WanSpec, QUEUE};

/// Bytes asked of one read.
const READ_SIZE: usize = 64 * 1024;

/// What a reader saw, to be replayed on the other side at its release time.
#[derive(Debug)]
pub(super) enum Segment {
    Data(Bytes),
    /// End of stream: shut down the other side's write half.
    Eof,
    /// The read failed: close both ways.
    Failed(std::io::Error),
}

/// A segment and the instant it may be written.
pub(super) type Timed = (Instant, Segment);

pub(super) async fn spawn(
    listen: SocketAddr,
    to: SocketAddr,
    spec: WanSpec,
) -> std::io::Result<RelayHandle> {
    let listener = TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let span = tracing::info_span!("wan_relay", proto = "tcp", %local, %to);
    let task = tokio::spawn(accept_loop(listener, to, spec, counters.clone()).instrument(span));
    Ok(RelayHandle {
        local,
        counters,
        task: task.abort_handle(),
    })
}

async fn accept_loop(listener: TcpListener, to: SocketAddr, spec: WanSpec, c: Arc<Counters>) {
    // Owning the connections here means aborting this task closes them all.
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let accepted_at = Instant::now();
                    c.tcp_connections.fetch_add(1, Ordering::Relaxed);
                    next_id += 1;
                    let span = tracing::debug_span!("conn", id = next_id, %peer);
                    let conn = relay(client, accepted_at, to, spec, c.clone());
                    conns.spawn(conn.instrument(span));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One client connection, from the emulated SYN to the last byte either way.
async fn relay(
    client: TcpStream,
    accepted_at: Instant,
    to: SocketAddr,
    spec: WanSpec,
    c: Arc<Counters>,
) {
    let _ = client.set_nodelay(true);
    // The SYN reaches the server one delay after the client sent it.
    sleep_until(accepted_at + spec.delay).await;
    let server = match TcpStream::connect(to).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "upstream connect failed; closing the client");
            // The refusal takes one delay to travel back.
            tokio::time::sleep(spec.delay).await;
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // A real client sends only after the SYN-ACK (2 delays), and its data takes a third.
    let first_send = accepted_at + 3 * spec.delay;
    let mut pumps = JoinSet::new();
    direction(
        &mut pumps,
        client_read,
        server_write,
        spec.delay,
        first_send,
        Dir::ToServer,
        &c,
    );
    direction(
        &mut pumps,
        server_read,
        client_write,
        spec.delay,
        accepted_at,
        Dir::ToClient,
        &c,
    );
    while let Some(done) = pumps.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "closing both ways");
                return; // dropping `pumps` aborts the other tasks and closes both sockets
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay task failed; closing both ways");
                return;
            }
        }
    }
}

/// Starts the reader and writer tasks of one direction.
fn direction<R, W>(
    pumps: &mut JoinSet<std::io::Result<()>>,
    from: R,
    to: W,
    delay: Duration,
    not_before: Instant,
    dir: Dir,
    c: &Arc<Counters>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(QUEUE);
    let c = c.clone();
    let span = tracing::debug_span!("dir", ?dir);
    pumps.spawn(read_side(from, tx, delay, not_before).instrument(span.clone()));
    pumps.spawn(write_side(rx, to, move |n| c.delivered(dir, n)).instrument(span));
}

/// Reads as fast as the socket gives, stamping each chunk with `max(now + delay, not_before)`.
pub(super) async fn read_side<R: AsyncRead + Unpin>(
    mut from: R,
    tx: mpsc::Sender<Timed>,
    delay: Duration,
    not_before: Instant,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(READ_SIZE);
        let segment = match from.read_buf(&mut buf).await {
            Ok(0) => Segment::Eof,
            Ok(_) => Segment::Data(buf.split().freeze()),
            Err(e) => Segment::Failed(e),
        };
        let last = !matches!(segment, Segment::Data(_));
        let at = (Instant::now() + delay).max(not_before);
        // A closed channel means the writer failed; it reports why.
        if tx.send((at, segment)).await.is_err() || last {
            return Ok(());
        }
    }
}

/// Writes each segment at its release time, in order; `delivered` counts the bytes written.
pub(super) async fn write_side<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Timed>,
    mut to: W,
    delivered: impl Fn(usize),
) -> std::io::Result<()> {
    while let Some((at, segment)) = rx.recv().await {
        if at > Instant::now() {
            sleep_until(at).await;
        }
        match segment {
            Segment::Data(bytes) => {
                to.write_all(&bytes).await?;
                delivered(bytes.len());
            }
            Segment::Eof => return to.shutdown().await,
            Segment::Failed(e) => return Err(e),
        }
    }
    Ok(())
}
