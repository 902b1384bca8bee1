//! A userspace WAN emulator: a TCP and UDP relay that adds a one-way delay in each direction (and
//! random loss for UDP), so two "regions" on loopback or in network namespaces are 150 ms apart
//! without `tc netem`.
//!
//! What is emulated:
//! - **Propagation delay**, the same one-way `delay` in each direction (RTT = 2 × delay). Every
//!   chunk read from one side is written to the other no earlier than `delay` after it was read.
//! - **The TCP handshake.** The relay accepts locally at once, so it charges what a real handshake
//!   costs: it connects upstream only `delay` after the accept (the SYN arriving), and releases the
//!   client's first bytes no earlier than 3 × delay after the accept (SYN-ACK back, then the data's
//!   own trip). A client that speaks first therefore sees 2 RTT to its first response byte on plain
//!   TCP and 3 RTT with TLS 1.3, as on a real path. Half-close (FIN) and errors travel with the same
//!   delay; an upstream that refuses the connection closes the client's connection.
//! - **UDP loss**, independently per datagram and per direction, from a seeded xorshift generator
//!   (the same seed gives the same drop pattern for the same datagram sequence). UDP is relayed
//!   NAT-style: one upstream socket per client address, forgotten after 60 s without traffic.
//!
//! What is not: bandwidth limits, queueing delay, jitter, reordering, duplication, TCP loss or
//! retransmission, MTU or fragmentation effects. The relay keeps order and forwards as fast as the
//! sockets go; in-flight data is bounded only by a queue of [`QUEUE`] chunks per direction.

mod tcp;
#[cfg(test)]
mod tests;
mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;

/// The largest accepted one-way delay.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Chunks (TCP reads, or datagrams) queued per direction before a reader waits (TCP) or a
/// datagram is dropped (UDP).
pub const QUEUE: usize = 4096;

/// The link between the two sides of a relay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WanSpec {
    /// One-way delay, added in each direction.
    pub delay: Duration,
    /// Probability (0.0 to 1.0) that a UDP datagram is dropped, in each direction. TCP is lossless.
    pub udp_loss: f64,
    /// Seed of the loss generator.
    pub seed: u64,
}

/// Why a [`WanSpec`] was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// The loss is not a probability.
    #[error("loss {0} is not a probability: expected a number from 0 to 1")]
    Loss(f64),
    /// The delay is above [`MAX_DELAY`].
    #[error("delay {} is above the limit of {}", humantime::format_duration(*.0), humantime::format_duration(MAX_DELAY))]
    Delay(Duration),
}

impl WanSpec {
    /// Checks the loss is within 0..=1 and the delay at most [`MAX_DELAY`].
    pub fn check(&self) -> Result<(), SpecError> {
        if !(0.0..=1.0).contains(&self.udp_loss) {
            return Err(SpecError::Loss(self.udp_loss));
        }
        if self.delay > MAX_DELAY {
            return Err(SpecError::Delay(self.delay));
        }
        Ok(())
    }

    /// The round-trip time the relay adds.
    pub fn rtt(&self) -> Duration {
        2 * self.delay
    }
}

/// What a relay has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// TCP connections accepted.
    pub tcp_connections: u64,
    /// Bytes delivered to the upstream (TCP payload and UDP datagrams).
    pub bytes_to_server: u64,
    /// Bytes delivered back to clients (TCP payload and UDP datagrams).
    pub bytes_to_client: u64,
    /// UDP datagrams delivered, both directions.
    pub udp_forwarded: u64,
    /// UDP datagrams dropped (by the loss rate, or a full queue), both directions.
    pub udp_dropped: u64,
    /// UDP client mappings currently open.
    pub udp_mappings: u64,
}

/// The live counters behind [`RelayStats`].
#[derive(Debug, Default)]
struct Counters {
    tcp_connections: AtomicU64,
    bytes_to_server: AtomicU64,
    bytes_to_client: AtomicU64,
    udp_forwarded: AtomicU64,
    udp_dropped: AtomicU64,
    udp_mappings: AtomicU64,
}

/// Which way bytes flow.
#[derive(Clone, Copy, Debug)]
enum Dir {
    ToServer,
    ToClient,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn delivered(&self, dir: Dir, bytes: usize) {
        let counter = match dir {
            Dir::ToServer => &self.bytes_to_server,
            Dir::ToClient => &self.bytes_to_client,
        };
        Self::add(counter, bytes as u64);
    }

    fn snapshot(&self) -> RelayStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            tcp_connections: get(&self.tcp_connections),
            bytes_to_server: get(&self.bytes_to_server),
            bytes_to_client: get(&self.bytes_to_client),
            udp_forwarded: get(&self.udp_forwarded),
            udp_dropped: get(&self.udp_dropped),
            udp_mappings: get(&self.udp_mappings),
        }
    }
}

/// A running relay. Dropping it stops the relay: the listener and every connection or mapping
/// it carries are closed.
#[derive(Debug)]
pub struct RelayHandle {
    local: SocketAddr,
    counters: Arc<Counters>,
    task: AbortHandle,
}

impl RelayHandle {
    /// The address the relay listens on (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The counters so far.
    pub fn stats(&self) -> RelayStats {
        self.counters.snapshot()
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        // The relay task owns its connections' tasks in a JoinSet, which aborts them when dropped.
        self.task.abort();
    }
}

/// Relays TCP from `listen` to `to` with the delays of `spec` (see the module documentation).
pub async fn spawn_tcp(
    listen: SocketAddr,
    to: SocketAddr,
    spec: WanSpec,
) -> std::io::Result<RelayHandle> {
    spec.check().map_err(invalid)?;
    tcp::spawn(listen, to, spec).await
}

/// Relays UDP from `listen` to `to` with the delay and loss of `spec`, one upstream socket per
/// client address (see the module documentation).
pub async fn spawn_udp(
    listen: SocketAddr,
    to: SocketAddr,
    spec: WanSpec,
) -> std::io::Result<RelayHandle> {
    spec.check().map_err(invalid)?;
    udp::spawn(listen, to, spec, udp::IDLE).await
}

fn invalid(e: SpecError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
}

/// A small seeded xorshift64 generator: enough to drop datagrams reproducibly.
#[derive(Clone, Debug)]
struct XorShift(u64);

impl XorShift {
    /// Seeds through splitmix64, so that 0 and neighbouring seeds give unrelated, non-zero states.
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (never for 0, always for 1).
    fn drops(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}
