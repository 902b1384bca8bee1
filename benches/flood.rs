//! Load and floods against a sidecar pair of real processes: many concurrent connections, and a
//! half-open handshake flood with the memory it leaves behind (issue 14, "Abuse and load").
//!
//! Setup: `trustline ca serve` (root + intermediate from `ca init`), an echo backend in this
//! process, sidecar B (`api`: inbound to the backend, allows `caller`) and sidecar A (`caller`:
//! an explicit listener to B), both `trustline sidecar` processes with their defaults (pooled
//! sessions, `handshake_timeout` 10 s). Real TLS 1.3, certificates from the CA.
//!
//! 1. **Concurrent connections.** `TL_FLOOD_CONNS` (10,000) connections to A's listener, opened
//!    256 at a time, each sending 16 bytes and reading them back through A → B → backend; all
//!    are held open together, then each does a second round trip. Reports how many were served,
//!    the errors, and the RSS of A and B idle and with every connection open (KiB per connection).
//! 2. **Handshake flood.** `TL_FLOOD_HALF_OPEN` (4,000) TCP connections to B's inbound, each
//!    sending one real ClientHello and then nothing (B answers its flight and waits for the
//!    client's certificate), kept at that number for `TL_FLOOD_SECS` (20 s): a connection B
//!    closes is replaced. Meanwhile a legitimate client on its own thread makes a new connection
//!    through A every 20 ms (one 16-byte round trip); its p50/p99 is compared with the same client
//!    before the flood, in the same run. B's RSS: idle, peak, and 10 s / 30 s after the flood ends
//!    (all flood sockets closed by the client).
//!
//! Run: `cargo bench --bench flood` (about 2 minutes; it opens ~25,000 descriptors across the
//! processes, so it raises its own RLIMIT_NOFILE to the hard limit, and the sidecars raise
//! theirs at start). Environment (optional): the three above and `TL_BENCH_BIN` (another
//! `trustline` binary, e.g. one built with another allocator). Exits non-zero when a legitimate
//! connection failed.

// Benchmarks measure wall time and drive blocking clients: the OS clock and thread sleeps are
// what they are for (clippy.toml bans them elsewhere).
#![allow(clippy::disallowed_methods)]

#[path = "support/mod.rs"]
mod support;
use support::{free_port, CaProcess};

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trustline::ca::admin;

const BIN: &str = env!("CARGO_BIN_EXE_trustline");
const TD: &str = "bench.test";
const PATIENCE: Duration = Duration::from_secs(30);
const MSG: &[u8; 16] = b"0123456789abcdef";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

fn main() -> ExitCode {
    if std::env::var_os("TL_FLOOD_BACKEND").is_some() {
        backend_process();
        return ExitCode::SUCCESS;
    }
    let limit = trustline::limits::raise_nofile_limit().expect("raising RLIMIT_NOFILE");
    eprintln!(
        "RLIMIT_NOFILE {:?} -> {:?} (hard {:?})",
        limit.before, limit.now, limit.hard
    );
    let bin = std::env::var_os("TL_BENCH_BIN").map_or_else(|| BIN.into(), PathBuf::from);
    let conns = env_or("TL_FLOOD_CONNS", 10_000) as usize;
    let half_open = env_or("TL_FLOOD_HALF_OPEN", 4_000) as usize;
    let flood_for = Duration::from_secs(env_or("TL_FLOOD_SECS", 20));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mesh = rt.block_on(Mesh::start(&bin));
    eprintln!(
        "binary {}; CA pid {}; A pid {} on {}, B pid {} on {}",
        bin.display(),
        mesh._ca.pid,
        mesh.a.pid,
        mesh.a_listener,
        mesh.b.pid,
        mesh.b_inbound
    );
    let mut ok = true;
    if conns > 0 {
        ok &= rt.block_on(concurrent(&mesh, conns));
    }
    if half_open > 0 {
        ok &= rt.block_on(handshake_flood(&mesh, half_open, flood_for));
    }
    if ok {
        return ExitCode::SUCCESS;
    }
    for name in ["caller", "api"] {
        let log = mesh._ca.dir.path().join(name).join(format!("{name}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- last lines of {name}'s log ---");
        for l in &lines[lines.len().saturating_sub(15)..] {
            eprintln!("{l}");
        }
    }
    ExitCode::FAILURE
}

/// A sidecar process, killed on drop; output in `DIR/NAME.log`.
struct Sidecar {
    child: Child,
    pid: u32,
    admin: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Mesh {
    _backend: Sidecar,
    _ca: CaProcess,
    a: Sidecar,
    b: Sidecar,
    a_listener: SocketAddr,
    b_inbound: SocketAddr,
}

fn workload(name: &str) -> String {
    format!("spiffe://{TD}/ns/bench/sa/{name}")
}

impl Mesh {
    async fn start(bin: &Path) -> Mesh {
        let ca = CaProcess::start(bin, TD, "trustline-flood-", &[], None, PATIENCE);
        let (backend, backend_child) = echo_backend_process();
        let b_inbound = free_port();
        let b = sidecar(
            bin,
            &ca,
            "api",
            &format!(
                "[inbound]\nlisten = \"{b_inbound}\"\napp_address = \"{backend}\"\nallow = [\"{}\"]\n",
                workload("caller")
            ),
        )
        .await;
        let a_listener = free_port();
        let a = sidecar(
            bin,
            &ca,
            "caller",
            &format!(
                "[[service]]\nname = \"api\"\naddresses = [\"{b_inbound}\"]\nspiffe_ids = [\"{}\"]\n\n\
                 [[listener]]\nlisten = \"{a_listener}\"\nservice = \"api\"\n",
                workload("api")
            ),
        )
        .await;
        Mesh {
            _backend: Sidecar {
                pid: backend_child.id(),
                child: backend_child,
                admin: backend,
            },
            _ca: ca,
            a,
            b,
            a_listener,
            b_inbound,
        }
    }
}

async fn sidecar(bin: &Path, ca: &CaProcess, name: &str, sections: &str) -> Sidecar {
    let dir = ca.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("sidecar dir");
    let token = admin::token(&ca.admin_socket(), &workload(name), 600)
        .await
        .expect("join token");
    std::fs::write(dir.join("join.token"), token).expect("token file");
    let admin = free_port();
    let config = format!(
        "trust_domain = \"{TD}\"\nspiffe_id = \"{id}\"\nbundle = {bundle:?}\n\n\
         [identity]\nsource = \"ca\"\nca_url = \"https://{api}\"\ntoken_file = \"join.token\"\n\n\
         [admin]\nlisten = \"{admin}\"\n\n{sections}",
        id = workload(name),
        bundle = ca.dir.path().join("root/bundle.pem"),
        api = ca.api,
    );
    let file = dir.join("sidecar.toml");
    std::fs::write(&file, config).expect("sidecar config");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let child = Command::new(bin)
        .args(["sidecar", "--config"])
        .arg(&file)
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawning a sidecar");
    let s = Sidecar {
        pid: child.id(),
        child,
        admin,
    };
    let deadline = Instant::now() + PATIENCE;
    while readyz(s.admin).await != Some(200) {
        assert!(Instant::now() < deadline, "sidecar {name} not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s
}

async fn readyz(admin: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut head = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut head))
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
}

/// The echo backend in a process of its own (this binary again, with `TL_FLOOD_BACKEND`): the
/// clients here and the backend's accepted sockets would not fit under one process's
/// descriptor limit at 10,000 connections.
fn echo_backend_process() -> (SocketAddr, Child) {
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .env("TL_FLOOD_BACKEND", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the backend");
    let mut line = String::new();
    let out = child.stdout.take().expect("backend stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
        .expect("the backend's address");
    (line.trim().parse().expect("an address"), child)
}

fn backend_process() {
    let _ = trustline::limits::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let addr = echo_backend().await;
        println!("{addr}");
        std::future::pending::<()>().await;
    });
}

async fn echo_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("backend");
    let addr = l.local_addr().expect("backend addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                eprintln!("the backend could not accept (descriptors?)");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn round_trip(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(MSG).await?;
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).await?;
    if &buf != MSG {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// Phase 1: `n` connections held open together through the pair.
async fn concurrent(mesh: &Mesh, n: usize) -> bool {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a0, b0) = (rss_kib(mesh.a.pid), rss_kib(mesh.b.pid));
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let gate = gate.clone();
        let addr = mesh.a_listener;
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore");
            let open = async {
                let mut s = TcpStream::connect(addr).await?;
                round_trip(&mut s).await?;
                Ok::<_, std::io::Error>(s)
            };
            let r = tokio::time::timeout(PATIENCE, open).await;
            drop(permit);
            match r {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no echo within {PATIENCE:?}")),
            }
        }));
    }
    let mut open = Vec::with_capacity(n);
    let mut errors: Vec<String> = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(s) => open.push(s),
            Err(e) => errors.push(e),
        }
    }
    let opened_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a1, b1) = (rss_kib(mesh.a.pid), rss_kib(mesh.b.pid));
    // Every held connection still carries bytes.
    let mut second = 0usize;
    for s in open.iter_mut() {
        if tokio::time::timeout(PATIENCE, round_trip(s))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            second += 1;
        }
    }
    let held = open.len();
    drop(open);
    println!("\n## {n} concurrent connections through the pair\n");
    println!("| | value |\n|---|---:|");
    println!("| served (first round trip) | {held} of {n} |");
    println!("| second round trip while all {held} are open | {second} of {held} |");
    println!("| errors | {} |", errors.len());
    println!("| time to open all | {:.1} s |", opened_in.as_secs_f64());
    println!("| RSS A idle / with all open | {} / {} |", mib(a0), mib(a1));
    println!("| RSS B idle / with all open | {} / {} |", mib(b0), mib(b1));
    let per = |x0: u64, x1: u64| (x1.saturating_sub(x0)) as f64 / held.max(1) as f64;
    println!(
        "| RSS per connection A / B / pair | {:.1} / {:.1} / {:.1} KiB |",
        per(a0, a1),
        per(b0, b1),
        per(a0 + b0, a1 + b1)
    );
    if !errors.is_empty() {
        errors.sort();
        errors.dedup();
        println!("\nerrors (distinct): {:?}", &errors[..errors.len().min(5)]);
    }
    errors.is_empty() && second == held
}

/// One real TLS 1.3 ClientHello to the mesh (the flood sends the same bytes each time: the
/// server does the same work either way).
fn client_hello() -> Vec<u8> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .expect("TLS 1.3")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![trustline::tls::mesh::MESH_ALPN.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("api").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("ClientHello");
    out
}

/// p50 and p99 of the legitimate client's new connections while `running`.
fn legit_client(
    addr: SocketAddr,
    running: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
) -> Vec<Duration> {
    let mut times = Vec::new();
    while running.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = (|| {
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(PATIENCE))?;
            s.write_all(MSG)?;
            let mut buf = [0u8; 16];
            s.read_exact(&mut buf)?;
            Ok::<_, std::io::Error>(())
        })();
        match r {
            Ok(()) => times.push(t.elapsed()),
            Err(_) => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    times
}

fn quantile(xs: &mut [Duration], q: f64) -> Duration {
    xs.sort();
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1]
}

/// Runs the legitimate client for `d` on its own thread.
fn measure_legit(addr: SocketAddr, d: Duration) -> std::thread::JoinHandle<(Vec<Duration>, u64)> {
    let running = Arc::new(AtomicBool::new(true));
    let failed = Arc::new(AtomicU64::new(0));
    let (r, f) = (running.clone(), failed.clone());
    let h = std::thread::spawn(move || legit_client(addr, r, f));
    std::thread::spawn(move || {
        std::thread::sleep(d);
        running.store(false, Ordering::Relaxed);
        let times = h.join().expect("legit client");
        (times, failed.load(Ordering::Relaxed))
    })
}

/// Phase 2: half-open handshakes at B's inbound; B's memory and the legitimate latency.
async fn handshake_flood(mesh: &Mesh, n: usize, flood_for: Duration) -> bool {
    let hello = Arc::new(client_hello());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(mesh.b.pid);
    let before = measure_legit(mesh.a_listener, Duration::from_secs(10));
    let (mut base, base_failed) = tokio::task::spawn_blocking(move || before.join())
        .await
        .expect("join")
        .expect("legit client");

    let flooding = Arc::new(AtomicBool::new(true));
    let closed_by_server = Arc::new(AtomicU64::new(0));
    let lifetimes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut flooders = Vec::new();
    for _ in 0..n {
        let (hello, flooding, closed, lifetimes) = (
            hello.clone(),
            flooding.clone(),
            closed_by_server.clone(),
            lifetimes.clone(),
        );
        let addr = mesh.b_inbound;
        flooders.push(tokio::spawn(async move {
            while flooding.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let opened = Instant::now();
                let _ = s.write_all(&hello).await;
                // Read (and drop) the server's flight until it closes, or the flood ends.
                let mut buf = [0u8; 4096];
                loop {
                    tokio::select! {
                        r = s.read(&mut buf) => match r {
                            Ok(0) | Err(_) => {
                                closed.fetch_add(1, Ordering::Relaxed);
                                lifetimes.lock().expect("lock").push(opened.elapsed());
                                break;
                            }
                            Ok(_) => {}
                        },
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {
                            if !flooding.load(Ordering::Relaxed) {
                                return;
                            }
                        }
                    }
                }
            }
        }));
    }
    let during = measure_legit(mesh.a_listener, flood_for);
    let mut peak = idle;
    let t0 = Instant::now();
    while t0.elapsed() < flood_for {
        peak = peak.max(rss_kib(mesh.b.pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    flooding.store(false, Ordering::Relaxed);
    for f in flooders {
        let _ = f.await;
    }
    let (mut flooded, flood_failed) = tokio::task::spawn_blocking(move || during.join())
        .await
        .expect("join")
        .expect("legit client");
    let ended = Instant::now();
    let at_end = rss_kib(mesh.b.pid);
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(ended.elapsed())).await;
    let after10 = rss_kib(mesh.b.pid);
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(ended.elapsed())).await;
    let after30 = rss_kib(mesh.b.pid);
    let mut lifetimes = lifetimes.lock().expect("lock").clone();

    let (b50, b99) = (quantile(&mut base, 0.5), quantile(&mut base, 0.99));
    let (f50, f99) = (quantile(&mut flooded, 0.5), quantile(&mut flooded, 0.99));
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "\n## Handshake flood: {n} half-open TLS handshakes held at B's inbound for {:?}\n",
        flood_for
    );
    println!("| | value |\n|---|---:|");
    println!(
        "| flood connections closed by B / their median lifetime | {} / {:.1} s |",
        closed_by_server.load(Ordering::Relaxed),
        quantile(&mut lifetimes, 0.5).as_secs_f64()
    );
    println!(
        "| legitimate p50 before / during (ratio) | {} / {} ({:.2}x) |",
        ms(b50),
        ms(f50),
        ratio(f50, b50)
    );
    println!(
        "| legitimate p99 before / during (ratio) | {} / {} ({:.2}x) |",
        ms(b99),
        ms(f99),
        ratio(f99, b99)
    );
    println!(
        "| legitimate requests before / during, failed | {} / {}, {} / {} |",
        base.len(),
        flooded.len(),
        base_failed,
        flood_failed
    );
    println!(
        "| RSS B idle / peak / end of flood / +10 s / +30 s | {} / {} / {} / {} / {} |",
        mib(idle),
        mib(peak),
        mib(at_end),
        mib(after10),
        mib(after30)
    );
    println!(
        "| RSS B after 30 s / idle | {:.2}x |",
        after30 as f64 / idle.max(1) as f64
    );
    base_failed == 0 && flood_failed == 0
}
