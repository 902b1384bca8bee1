//! Sidecar start to ready with a local CA. Goal: ≤ 100 ms.
//!
//! The real `trustline ca serve` runs in its own process (root + regional intermediate made by
//! `trustline ca init`). Then, `TL_BENCH_RUNS` times (20), with a fresh join token minted through
//! the CA's admin socket before each start (tokens are single-use): write a sidecar config with
//! `[identity] source = "ca"`, spawn `trustline sidecar --config`, and poll its admin `/readyz`
//! (HTTP/1.0 over a new TCP connection, 1 ms between attempts) until it answers 200. Ready means
//! the sidecar holds a verified SVID: it read its config and bundle, bound its listeners, sent a
//! CSR with the token to the CA over TLS 1.3 and checked the chain it got back. One untimed
//! start comes first (cold page cache, first connection to the CA).
//!
//! The sidecar's stdout and stderr are read as they arrive, which gives a breakdown: when
//! `proxy::build` returned (the "admin http://…/readyz" line), when the SVID was published (its
//! log line), when the admin port first answered at all, and when `/readyz` said 200.
//!
//! Run: `cargo bench --bench startup`. Environment (optional): `TL_BENCH_RUNS` (20),
//! `TL_BENCH_BIN` (another `trustline` binary). Exits non-zero if a sidecar is not ready in 10 s.

// Benchmarks measure wall time and drive blocking clients outside tokio: the OS clock and
// thread sleeps are what they are for (clippy.toml bans them elsewhere).
#![allow(clippy::disallowed_methods)]

#[path = "support/mod.rs"]
mod support;
use support::{free_port, CaProcess};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use trustline::ca::admin;

const BIN: &str = env!("CARGO_BIN_EXE_trustline");
const TRUST_DOMAIN: &str = "bench.test";
const GOAL: Duration = Duration::from_millis(100);
const PATIENCE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(1);

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; everything else comes from the environment.
    let runs: usize = std::env::var("TL_BENCH_RUNS")
        .map(|v| v.parse().expect("TL_BENCH_RUNS is a number"))
        .unwrap_or(20);
    let bin = std::env::var_os("TL_BENCH_BIN").map_or_else(|| BIN.into(), PathBuf::from);
    let ca = CaProcess::start(
        &bin,
        TRUST_DOMAIN,
        "trustline-startup-",
        &[],
        None,
        PATIENCE,
    );
    eprintln!("CA (pid {}) on {}; {runs} sidecar starts", ca.pid, ca.api);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime for the admin socket");
    let mut starts = Vec::with_capacity(runs);
    for i in 0..=runs {
        let token = rt
            .block_on(admin::token(&ca.admin_socket(), &workload(i), 600))
            .unwrap_or_else(|e| panic!("minting a join token: {e}"));
        match start_once(&bin, &ca, i, &token) {
            Ok(s) if i == 0 => eprintln!("untimed first start: ready after {}", ms(s.ready)),
            Ok(s) => starts.push(s),
            Err(why) => {
                eprintln!("start {i} failed: {why}");
                return ExitCode::FAILURE;
            }
        }
    }
    report(&starts);
    ExitCode::SUCCESS
}

/// Times of one start, from just before `spawn`.
struct Start {
    /// `proxy::build` returned: config, bundle, listeners bound (its stdout line arrived).
    bound: Option<Duration>,
    /// The SVID was verified and published (its log line arrived).
    published: Option<Duration>,
    /// The admin port answered HTTP for the first time (any status).
    admin_up: Duration,
    /// `/readyz` answered 200.
    ready: Duration,
}

fn workload(i: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/startup-{i}")
}

/// Starts sidecar `i`, waits until ready, kills it.
fn start_once(bin: &Path, ca: &CaProcess, i: usize, token: &str) -> Result<Start, String> {
    let dir = ca.dir.path().join(format!("sidecar-{i}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("join.token"), token).map_err(|e| e.to_string())?;
    let admin = free_port();
    let config = format!(
        r#"trust_domain = "{TRUST_DOMAIN}"
spiffe_id = "{id}"
bundle = {bundle:?}

[identity]
source = "ca"
ca_url = "https://{api}"
token_file = "join.token"

[admin]
listen = "{admin}"

[inbound]
listen = "127.0.0.1:0"
app_address = "127.0.0.1:9"
allow = ["spiffe://{TRUST_DOMAIN}/ns/bench/sa/caller"]
"#,
        id = workload(i),
        bundle = ca.dir.path().join("root/bundle.pem"),
        api = ca.api,
    );
    let config_file = dir.join("sidecar.toml");
    std::fs::write(&config_file, config).map_err(|e| e.to_string())?;

    let (tx, lines) = mpsc::channel();
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args(["sidecar", "--config"])
        .arg(&config_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the sidecar: {e}"))?;
    forward_lines(child.stdout.take(), tx.clone());
    forward_lines(child.stderr.take(), tx);
    let polled = poll_ready(&mut child, admin, t0);
    // The "SVID published" line is written just after the SVID is, so it may still be on its way.
    let log = collect(&lines, Duration::from_millis(200));
    let _ = child.kill();
    let _ = child.wait();
    let (admin_up, ready) = polled.map_err(|why| format!("{why}\n{}", tail(&log)))?;
    let first = |needle: &str| {
        log.iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| t.duration_since(t0))
    };
    Ok(Start {
        bound: first("admin http://"),
        published: first("SVID published"),
        admin_up,
        ready,
    })
}

/// Polls `/readyz` until 200; the times of the first HTTP answer and of the 200.
fn poll_ready(
    child: &mut Child,
    admin: SocketAddr,
    t0: Instant,
) -> Result<(Duration, Duration), String> {
    let mut admin_up = None;
    loop {
        if let Some(status) = readyz(admin) {
            let at = t0.elapsed();
            admin_up.get_or_insert(at);
            if status == 200 {
                return Ok((admin_up.unwrap_or(at), at));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("sidecar exited before ready ({status})"));
        }
        if t0.elapsed() > PATIENCE {
            return Err(format!("sidecar not ready after {PATIENCE:?}"));
        }
        std::thread::sleep(POLL);
    }
}

/// The status of `GET /readyz`, or `None` if the admin port does not answer (yet).
fn readyz(admin: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut head = Vec::new();
    s.take(64).read_to_end(&mut head).ok()?;
    // "HTTP/1.0 200 OK"
    std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
}

/// Sends each line of `pipe` with its arrival time, from a thread.
fn forward_lines(pipe: Option<impl Read + Send + 'static>, tx: mpsc::Sender<(Instant, String)>) {
    let Some(pipe) = pipe else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
}

/// The lines received so far, waiting up to `grace` for the SVID's log line.
fn collect(lines: &mpsc::Receiver<(Instant, String)>, grace: Duration) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + grace;
    let mut got: Vec<(Instant, String)> = Vec::new();
    while !got.iter().any(|(_, l)| l.contains("SVID published")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => got.push(line),
            Err(_) => break,
        }
    }
    got.extend(lines.try_iter());
    got
}

fn tail(log: &[(Instant, String)]) -> String {
    let from = log.len().saturating_sub(20);
    log[from..]
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Median, p90 (nearest rank), min and max of `xs` as a table row.
fn row(name: &str, mut xs: Vec<Duration>) -> String {
    if xs.is_empty() {
        return format!("| {name} | – | – | – | – |");
    }
    xs.sort();
    let rank = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
    format!(
        "| {name} | {} | {} | {} | {} |",
        ms(rank(0.5)),
        ms(rank(0.9)),
        ms(xs[0]),
        ms(xs[xs.len() - 1])
    )
}

fn report(starts: &[Start]) {
    let all = |f: fn(&Start) -> Option<Duration>| starts.iter().filter_map(f).collect::<Vec<_>>();
    println!(
        "\nsidecar start to ready, {} starts (from spawn):\n",
        starts.len()
    );
    println!("| stage | median | p90 | min | max |\n|---|---:|---:|---:|---:|");
    println!("{}", row("built: listeners bound", all(|s| s.bound)));
    println!("{}", row("SVID published (log line)", all(|s| s.published)));
    println!("{}", row("admin answers", all(|s| Some(s.admin_up))));
    println!("{}", row("**ready** (/readyz 200)", all(|s| Some(s.ready))));
    let mut ready = all(|s| Some(s.ready));
    ready.sort();
    let met = ready.iter().filter(|r| **r <= GOAL).count();
    println!(
        "\ngoal ≤ {}: {met} of {} starts within it",
        ms(GOAL),
        ready.len()
    );
}
