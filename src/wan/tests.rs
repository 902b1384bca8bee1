use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::tcp::{read_side, write_side, Segment};
use super::*;

fn spec(delay_ms: u64, udp_loss: f64) -> WanSpec {
    WanSpec {
        delay: Duration::from_millis(delay_ms),
        udp_loss,
        seed: 1,
    }
}

#[test]
fn wan_spec_check_accepts_probabilities_and_delays_up_to_the_limit() {
    for (loss, delay_ms, want) in [
        (0.0, 0, Ok(())),
        (1.0, 10_000, Ok(())),
        (0.01, 75, Ok(())),
        (1.5, 75, Err(SpecError::Loss(1.5))),
        (-0.1, 75, Err(SpecError::Loss(-0.1))),
        (
            0.0,
            10_001,
            Err(SpecError::Delay(Duration::from_millis(10_001))),
        ),
    ] {
        assert_eq!(
            spec(delay_ms, loss).check(),
            want,
            "loss {loss}, delay {delay_ms} ms"
        );
    }
    assert!(spec(1, f64::NAN).check().is_err());
    assert_eq!(spec(75, 0.0).rtt(), Duration::from_millis(150));
}

#[test]
fn wan_xorshift_is_reproducible_and_drops_at_the_asked_rate() {
    let draw = |seed| {
        let mut r = XorShift::new(seed);
        (0..8).map(|_| r.next_u64()).collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
    assert!(
        draw(0).iter().all(|x| *x != 0),
        "seed 0 must not stick at 0"
    );

    let mut r = XorShift::new(9);
    let dropped = (0..100_000).filter(|_| r.drops(0.1)).count();
    assert!(
        (9_000..11_000).contains(&dropped),
        "{dropped} of 100000 at 10%"
    );
    assert!((0..1000).all(|_| !r.drops(0.0) && r.drops(1.0)));
}

#[tokio::test]
async fn wan_pump_keeps_order_and_releases_no_earlier_than_the_floor() {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (mut near, far) = tokio::io::duplex(1 << 16);
    let (mut out, sink) = tokio::io::duplex(1 << 16);
    let start = Instant::now();
    let floor = start + Duration::from_millis(60);
    let reader = tokio::spawn(read_side(far, tx, Duration::from_millis(10), floor));
    let writer = tokio::spawn(write_side(rx, sink, |_| {}));
    tokio::io::AsyncWriteExt::write_all(&mut near, b"one two three")
        .await
        .unwrap();
    drop(near); // EOF: the write side is shut down after the delay too

    let mut got = Vec::new();
    out.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"one two three");
    assert!(
        start.elapsed() >= Duration::from_millis(60),
        "{:?}",
        start.elapsed()
    );
    reader.await.unwrap().unwrap();
    writer.await.unwrap().unwrap();
}

#[tokio::test]
async fn wan_pump_turns_a_read_error_into_a_failed_write_side() {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (_out, sink) = tokio::io::duplex(64);
    tx.send((
        Instant::now(),
        Segment::Failed(std::io::ErrorKind::ConnectionReset.into()),
    ))
    .await
    .unwrap();
    let err = write_side(rx, sink, |_| {}).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn wan_udp_mapping_is_forgotten_after_the_idle_time() {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let relay = udp::spawn(listen, to, spec(5, 0.0), Duration::from_millis(100))
        .await
        .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(relay.local_addr()).await.unwrap();
    client.send(b"x").await.unwrap();
    let mut buf = [0u8; 8];
    let patience = Duration::from_secs(20);
    tokio::time::timeout(patience, client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(relay.stats().udp_mappings, 1);

    let deadline = Instant::now() + patience;
    while relay.stats().udp_mappings > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.stats().udp_mappings, 0, "the idle mapping stayed");
    // The client is welcome back with a new mapping.
    client.send(b"y").await.unwrap();
    tokio::time::timeout(patience, client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..1], b"y");
}
