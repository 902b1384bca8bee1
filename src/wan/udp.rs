//! The UDP side of the relay, NAT-style: the listening socket receives from every client; each
//! client address gets its own upstream socket (so replies find their way back), dropped after
//! [`IDLE`] without traffic either way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tracing::Instrument;

use super::{Counters, Dir, RelayHandle, WanSpec, XorShift, QUEUE};

/// How long a client mapping lives without traffic.
pub(super) const IDLE: Duration = Duration::from_secs(60);

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 64 * 1024;

/// A datagram and the instant it may be sent on.
type Timed = (Instant, Bytes);

pub(super) async fn spawn(
    listen: SocketAddr,
    to: SocketAddr,
    spec: WanSpec,
    idle: Duration,
) -> std::io::Result<RelayHandle> {
    let socket = Arc::new(UdpSocket::bind(listen).await?);
    let local = socket.local_addr()?;
    let counters = Arc::new(Counters::default());
    let relay = Relay {
        socket,
        to,
        spec,
        idle,
        c: counters.clone(),
    };
    let span = tracing::info_span!("wan_relay", proto = "udp", %local, %to);
    let task = tokio::spawn(relay.run().instrument(span));
    Ok(RelayHandle {
        local,
        counters,
        task: task.abort_handle(),
    })
}

struct Relay {
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    spec: WanSpec,
    idle: Duration,
    c: Arc<Counters>,
}

impl Relay {
    async fn run(self) {
        let mut mappings: HashMap<SocketAddr, mpsc::Sender<Timed>> = HashMap::new();
        // Owning the mappings here means aborting this task closes them all.
        let mut tasks = JoinSet::new();
        let mut loss = XorShift::new(self.spec.seed);
        let mut opened = 0u64;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, client) = tokio::select! {
                got = self.socket.recv_from(&mut buf) => match got {
                    Ok(got) => got,
                    Err(e) => {
                        tracing::debug!(error = %e, "receive failed");
                        continue;
                    }
                },
                Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                    // A replaced mapping's sender is open: only forget the one that ended.
                    if let Ok(client) = ended {
                        if mappings.get(&client).is_some_and(|tx| tx.is_closed()) {
                            mappings.remove(&client);
                        }
                    }
                    self.gauge(&mappings);
                    continue;
                }
            };
            let open = mappings.get(&client).is_some_and(|tx| !tx.is_closed());
            if !open {
                opened += 1;
                match self.open(client, opened, &mut tasks).await {
                    Ok(tx) => mappings.insert(client, tx),
                    Err(e) => {
                        tracing::warn!(error = %e, %client, "cannot open an upstream socket");
                        continue;
                    }
                };
                self.gauge(&mappings);
            }
            let datagram = (
                Instant::now() + self.spec.delay,
                Bytes::copy_from_slice(&buf[..n]),
            );
            if loss.drops(self.spec.udp_loss) || mappings[&client].try_send(datagram).is_err() {
                self.c.udp_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn gauge(&self, mappings: &HashMap<SocketAddr, mpsc::Sender<Timed>>) {
        let open = mappings.values().filter(|tx| !tx.is_closed()).count();
        self.c.udp_mappings.store(open as u64, Ordering::Relaxed);
    }

    /// Binds the client's upstream socket and starts its mapping task.
    async fn open(
        &self,
        client: SocketAddr,
        nth: u64,
        tasks: &mut JoinSet<SocketAddr>,
    ) -> std::io::Result<mpsc::Sender<Timed>> {
        // Any address of the family: the kernel picks the source that routes to `to` (the relay
        // may sit between two networks, e.g. namespaces joined by veths).
        let any: std::net::IpAddr = if self.to.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let upstream = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
        upstream.connect(self.to).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let mapping = Mapping {
            client,
            upstream,
            socket: self.socket.clone(),
            spec: self.spec,
            idle: self.idle,
            // Each mapping's replies get their own reproducible drop sequence.
            loss: XorShift::new(self.spec.seed ^ nth.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            c: self.c.clone(),
        };
        let span = tracing::debug_span!("mapping", %client);
        tracing::debug!(%client, "new mapping");
        tasks.spawn(mapping.run(rx).instrument(span));
        Ok(tx)
    }
}

/// One client's upstream socket, with its two delayed directions and its idle timer.
struct Mapping {
    client: SocketAddr,
    upstream: UdpSocket,
    socket: Arc<UdpSocket>,
    spec: WanSpec,
    idle: Duration,
    loss: XorShift,
    c: Arc<Counters>,
}

impl Mapping {
    /// Relays until idle for `self.idle`; returns the client address.
    async fn run(self, mut to_server: mpsc::Receiver<Timed>) -> SocketAddr {
        let Mapping {
            client,
            upstream,
            socket,
            spec,
            idle,
            mut loss,
            c,
        } = self;
        let start = Instant::now();
        // Milliseconds after `start` of the last datagram either way.
        let last = AtomicU64::new(0);
        let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let (reply_tx, mut reply_rx) = mpsc::channel::<Timed>(QUEUE);
        let (c, upstream) = (&c, &upstream);

        let up = async {
            while let Some((at, datagram)) = to_server.recv().await {
                touch();
                sleep_until(at).await;
                match upstream.send(&datagram).await {
                    Ok(n) => Self::sent(c, Dir::ToServer, n),
                    Err(e) => tracing::debug!(error = %e, "send upstream failed"),
                }
            }
        };
        let replies = async {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                // Refused (ICMP from a closed port) shows up here; the mapping stays.
                let n = match upstream.recv(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(error = %e, "receive from upstream failed");
                        continue;
                    }
                };
                touch();
                let reply = (
                    Instant::now() + spec.delay,
                    Bytes::copy_from_slice(&buf[..n]),
                );
                if loss.drops(spec.udp_loss) || reply_tx.try_send(reply).is_err() {
                    c.udp_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let down = async {
            while let Some((at, datagram)) = reply_rx.recv().await {
                sleep_until(at).await;
                match socket.send_to(&datagram, client).await {
                    Ok(n) => Self::sent(c, Dir::ToClient, n),
                    Err(e) => tracing::debug!(error = %e, "send to client failed"),
                }
            }
        };
        tokio::select! {
            _ = quiet(start, &last, idle) => tracing::debug!("idle: mapping removed"),
            _ = async { tokio::join!(up, replies, down) } => {}
        }
        client
    }

    fn sent(c: &Counters, dir: Dir, bytes: usize) {
        c.udp_forwarded.fetch_add(1, Ordering::Relaxed);
        c.delivered(dir, bytes);
    }
}

/// Returns once `idle` has passed since the last activity, stored in `last` as milliseconds after
/// `start`.
async fn quiet(start: Instant, last: &AtomicU64, idle: Duration) {
    loop {
        let quiet_until = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= quiet_until {
            return;
        }
        sleep_until(quiet_until).await;
    }
}
