//! The WAN emulator on real sockets: delays are lower bounds (a slow machine only makes things
//! later), so only lower bounds are asserted; anything that could hang has a generous timeout.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use common::trustline;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::timeout;
use trustline::wan::{spawn_tcp, spawn_udp, RelayHandle, RelayStats, WanSpec};

/// Longest any wait may take before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn spec(delay_ms: u64, udp_loss: f64) -> WanSpec {
    WanSpec {
        delay: Duration::from_millis(delay_ms),
        udp_loss,
        seed: 7,
    }
}

/// A TCP echo server; it reports when it accepted and when the first byte arrived.
async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<(Instant, Instant)>) {
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let accepted = Instant::now();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut first = true;
                loop {
                    let n = match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if first {
                        first = false;
                        let _ = tx.send((accepted, Instant::now()));
                    }
                    if tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn tcp_relay(delay_ms: u64, to: SocketAddr) -> RelayHandle {
    spawn_tcp(any_port(), to, spec(delay_ms, 0.0))
        .await
        .unwrap()
}

#[tokio::test]
async fn tcp_first_response_pays_the_handshake_then_one_rtt_per_exchange() {
    let delay = Duration::from_millis(40);
    let (server, mut server_times) = echo_server().await;
    let relay = tcp_relay(40, server).await;

    let start = Instant::now();
    let mut tcp = TcpStream::connect(relay.local_addr()).await.unwrap();
    tcp.write_all(b"p").await.unwrap();
    let mut byte = [0u8; 1];
    timeout(PATIENCE, tcp.read_exact(&mut byte))
        .await
        .unwrap()
        .unwrap();
    let first = start.elapsed();
    let (accepted, first_byte) = server_times.recv().await.unwrap();
    // SYN: 1 delay; SYN-ACK back and the data's trip: 2 more; the echo back: 1 more.
    assert!(
        accepted - start >= delay,
        "server accepted after {:?}",
        accepted - start
    );
    assert!(
        first_byte - start >= 3 * delay,
        "first byte at server after {:?}",
        first_byte - start
    );
    assert!(first >= 4 * delay, "first echoed byte after {first:?}");

    let again = Instant::now();
    tcp.write_all(b"q").await.unwrap();
    timeout(PATIENCE, tcp.read_exact(&mut byte))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&byte, b"q");
    assert!(
        again.elapsed() >= 2 * delay,
        "ping-pong took {:?}",
        again.elapsed()
    );
    assert_eq!(relay.stats().tcp_connections, 1);
}

/// The message pattern of TLS 1.3 (ClientHello; ServerHello..Finished; client Finished with the
/// request; response) costs 3 RTT to the first response byte through the relay, as on a real WAN.
#[tokio::test]
async fn tcp_tls13_shaped_exchange_costs_three_rtt() {
    let delay = Duration::from_millis(40);
    let (server, _times) = echo_server().await;
    let relay = tcp_relay(40, server).await;

    let start = Instant::now();
    let mut tcp = TcpStream::connect(relay.local_addr()).await.unwrap();
    let mut byte = [0u8; 1];
    tcp.write_all(b"h").await.unwrap(); // ClientHello
    timeout(PATIENCE, tcp.read_exact(&mut byte))
        .await
        .unwrap()
        .unwrap(); // server flight
    tcp.write_all(b"r").await.unwrap(); // Finished + request
    timeout(PATIENCE, tcp.read_exact(&mut byte))
        .await
        .unwrap()
        .unwrap(); // response
    assert_eq!(&byte, b"r");
    assert!(
        start.elapsed() >= 6 * delay,
        "first response after {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn tcp_carries_a_mebibyte_each_way_intact() {
    let (server, _times) = echo_server().await;
    let relay = tcp_relay(40, server).await;
    let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();

    let tcp = TcpStream::connect(relay.local_addr()).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let data = sent.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    timeout(PATIENCE, rd.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "echoed bytes differ");
    let stats = relay.stats();
    assert_eq!(stats.bytes_to_server, 1 << 20);
    assert_eq!(stats.bytes_to_client, 1 << 20);
}

#[tokio::test]
async fn tcp_half_close_reaches_the_server_which_can_still_answer() {
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap(); // returns only on EOF
        tcp.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
    });
    let relay = tcp_relay(20, server).await;

    let mut tcp = TcpStream::connect(relay.local_addr()).await.unwrap();
    tcp.write_all(b"hello").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut answer = String::new();
    timeout(PATIENCE, tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 5 bytes");
}

#[tokio::test]
async fn tcp_upstream_down_closes_the_client() {
    let closed = {
        let l = TcpListener::bind(any_port()).await.unwrap();
        l.local_addr().unwrap()
    }; // nothing listens there any more
    let relay = tcp_relay(20, closed).await;

    let mut tcp = TcpStream::connect(relay.local_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = timeout(PATIENCE, tcp.read(&mut buf))
        .await
        .expect("the relay must close the client, not leave it hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(relay.stats().tcp_connections, 1);
}

#[tokio::test]
async fn dropping_the_handle_closes_the_listener_and_its_connections() {
    let (server, _times) = echo_server().await;
    let relay = tcp_relay(10, server).await;
    let addr = relay.local_addr();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    timeout(PATIENCE, tcp.read_exact(&mut byte))
        .await
        .unwrap()
        .unwrap();

    drop(relay);
    let read = timeout(PATIENCE, tcp.read(&mut byte))
        .await
        .expect("the open connection must be closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

/// A UDP echo server that prefixes each reply with the port it saw the datagram from.
async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind(any_port()).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            let mut reply = from.port().to_be_bytes().to_vec();
            reply.extend_from_slice(&buf[..n]);
            socket.send_to(&reply, from).await.unwrap();
        }
    });
    addr
}

/// The relay's stats once `done` holds for them (or after [`PATIENCE`]).
async fn stats_when(relay: &RelayHandle, done: impl Fn(&RelayStats) -> bool) -> RelayStats {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = relay.stats();
        if done(&stats) || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn udp_client(relay: &RelayHandle) -> UdpSocket {
    let socket = UdpSocket::bind(any_port()).await.unwrap();
    socket.connect(relay.local_addr()).await.unwrap();
    socket
}

/// Receives one reply: (the port the server saw, the payload).
async fn reply(socket: &UdpSocket) -> (u16, Vec<u8>) {
    let mut buf = vec![0u8; 64 * 1024];
    let n = timeout(PATIENCE, socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    (u16::from_be_bytes([buf[0], buf[1]]), buf[2..n].to_vec())
}

#[tokio::test]
async fn udp_datagrams_arrive_intact_in_order_after_one_rtt() {
    let delay = Duration::from_millis(20);
    let relay = spawn_udp(any_port(), udp_echo().await, spec(20, 0.0))
        .await
        .unwrap();
    let client = udp_client(&relay).await;

    let payload = |i: usize| vec![i as u8; 1 + i * 37];
    let mut sent_at = Vec::new();
    for i in 0..50 {
        sent_at.push(Instant::now());
        client.send(&payload(i)).await.unwrap();
    }
    for (i, at) in sent_at.iter().enumerate() {
        let (_, got) = reply(&client).await;
        assert_eq!(got, payload(i), "datagram {i}");
        assert!(
            at.elapsed() >= 2 * delay,
            "datagram {i} back after {:?}",
            at.elapsed()
        );
    }
    // Near the 64 KiB limit.
    let big = vec![0xa5u8; 65_000];
    client.send(&big).await.unwrap();
    assert_eq!(reply(&client).await.1, big);
    // The relay counts a datagram just after sending it, so the count may trail the reply.
    let stats = stats_when(&relay, |s| s.udp_forwarded >= 102).await;
    assert_eq!((stats.udp_forwarded, stats.udp_dropped), (102, 0));
    assert_eq!(stats.udp_mappings, 1);
}

#[tokio::test]
async fn udp_total_loss_drops_everything_and_counts_it() {
    let relay = spawn_udp(any_port(), udp_echo().await, spec(20, 1.0))
        .await
        .unwrap();
    let client = udp_client(&relay).await;
    for i in 0..20u8 {
        client.send(&[i]).await.unwrap();
    }
    let mut buf = [0u8; 64];
    let got = timeout(Duration::from_millis(300), client.recv(&mut buf)).await;
    assert!(
        got.is_err(),
        "a datagram came through a 100% loss link: {got:?}"
    );
    let stats = stats_when(&relay, |s| s.udp_dropped >= 20).await;
    assert_eq!((stats.udp_dropped, stats.udp_forwarded), (20, 0));
}

#[tokio::test]
async fn udp_clients_get_their_own_mappings_and_their_own_replies() {
    let relay = spawn_udp(any_port(), udp_echo().await, spec(20, 0.0))
        .await
        .unwrap();
    let (a, b) = (udp_client(&relay).await, udp_client(&relay).await);
    for round in 0..3u8 {
        a.send(&[b'a', round]).await.unwrap();
        b.send(&[b'b', round]).await.unwrap();
    }
    let mut ports = Vec::new();
    for (socket, name) in [(&a, b'a'), (&b, b'b')] {
        for round in 0..3u8 {
            let (port, got) = reply(socket).await;
            assert_eq!(got, [name, round]);
            ports.push(port);
        }
    }
    // Each client is seen upstream from one port of its own.
    assert!(ports[..3].iter().all(|p| *p == ports[0]), "{ports:?}");
    assert!(ports[3..].iter().all(|p| *p == ports[3]), "{ports:?}");
    assert_ne!(ports[0], ports[3]);
    assert_eq!(relay.stats().udp_mappings, 2);
}

#[test]
fn cli_refuses_bad_values_with_a_clear_message() {
    let base = [
        "wan-relay",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "127.0.0.1:9",
    ];
    for (extra, expected) in [
        (
            &["--delay", "75ms", "--loss", "2"][..],
            "--loss: loss 2 is not a probability",
        ),
        (
            &["--delay", "75ms", "--loss", "-0.1"][..],
            "--loss: loss -0.1 is not a probability",
        ),
        (
            &["--delay", "11s"][..],
            "--delay: delay 11s is above the limit of 10s",
        ),
        (
            &["--delay", "fast"][..],
            "--delay: invalid duration \"fast\"",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (ok, out) = trustline(&args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(out.contains(expected), "{args:?}: {out}");
    }
}
