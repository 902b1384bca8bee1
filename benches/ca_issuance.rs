//! Load benchmark of the CA's SVID issuance over keep-alive HTTPS.
//!
//! The real `trustline ca serve` binary runs in its own process with its durable redb ledger
//! (group commit), audit log and default logging; this process is the load generator. Both share
//! the machine's cores, as a CA and its clients would not in production, so the figures are a
//! floor.
//!
//! 1. **Renewal, max throughput**: every client keeps one keep-alive mTLS connection (presenting
//!    its current SVID) and posts a CSR as soon as the previous answer arrived (closed loop).
//! 2. **Renewal at a fixed rate**: requests are scheduled at fixed intervals spread over the same
//!    connections; latency runs from the *scheduled* start, so a stall is charged to every
//!    request it delays (no coordinated omission).
//! 3. **First issuance by join token**: tokens minted through the admin socket before timing, each
//!    spent once over keep-alive connections without a client certificate.
//!
//! Run with `cargo bench --bench ca_issuance`. Environment (all optional):
//! `TL_BENCH_SECS` (measured seconds per phase, 10), `TL_BENCH_WARMUP` (seconds, 2),
//! `TL_BENCH_CLIENTS` (connections, 32), `TL_BENCH_RATE` (phase 2 requests/s, 2000),
//! `TL_BENCH_TOKENS` (phase 3 tokens, 1500 × secs), `TL_BENCH_THREADS` (load generator worker
//! threads, 1), `TL_BENCH_SERVER_LOG` (the server's `RUST_LOG`; unset keeps its default `info`),
//! `TL_BENCH_DUMP` (a directory to write phase 2's per-request `phase2.csv` and the server log),
//! `TL_BENCH_BIN` (another `trustline` binary to serve, e.g. an older build for an A/B run).
//!
//! `TL_BENCH_LEDGER=postgres` runs the same phases against **two replicas** on one shared
//! PostgreSQL ledger instead: a private PostgreSQL server is started for the run (as in
//! `tests/ca_postgres.rs`), both `ca serve` replicas use it, the clients' connections alternate
//! between the replicas, and "server" CPU and disk writes are those of both replicas and every
//! PostgreSQL process together. `TL_BENCH_REPLICAS` (2) sets how many replicas.
//!
//! Any failed request, or a ledger that does not hold every serial answered with 200, is printed
//! and makes the benchmark exit non-zero.

// Benchmarks measure wall time and drive blocking clients outside tokio: the OS clock and
// thread sleeps are what they are for (clippy.toml bans them elsewhere).
#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/postgres.rs"]
mod postgres;
#[path = "support/mod.rs"]
mod support;
use support::CaProcess;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::str::FromStr;
use std::time::Duration;

use hyper::StatusCode;
use tokio::time::Instant;
use trustline::ca::admin;
use trustline::ca::ledger::{Ledger, PgLedger, PgUrl, RedbLedger};
use trustline::clock::Clock;
use trustline::identity::{parse_trust_domain, parse_workload_id, Bundle, SpiffeId, Svid};
use trustline::svid::ca_client::{make_csr, CaClient, CaConnection};

/// The server binary Cargo built with this benchmark.
const BIN: &str = env!("CARGO_BIN_EXE_trustline");
const TRUST_DOMAIN: &str = "bench.test";
/// Goals from the issue.
const GOAL_THROUGHPUT: f64 = 5000.0;
const GOAL_P99_MS: f64 = 10.0;
/// Failure messages kept per phase for the report.
const KEEP_ERRORS: usize = 3;

/// What to run, from the environment.
struct Settings {
    secs: Duration,
    warmup: Duration,
    clients: usize,
    rate: f64,
    tokens: usize,
    threads: usize,
    server_log: Option<String>,
    dump: Option<PathBuf>,
    bin: PathBuf,
    /// `TL_BENCH_LEDGER=postgres`: this many replicas on a shared PostgreSQL ledger.
    replicas: Option<usize>,
}

fn env_num<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Self {
        let secs: f64 = env_num("TL_BENCH_SECS", 10.0);
        let clients: usize = env_num("TL_BENCH_CLIENTS", 32).max(1);
        let tokens: usize = env_num("TL_BENCH_TOKENS", (1500.0 * secs) as usize);
        Settings {
            secs: Duration::from_secs_f64(secs),
            warmup: Duration::from_secs_f64(env_num("TL_BENCH_WARMUP", 2.0)),
            clients,
            rate: env_num("TL_BENCH_RATE", 2000.0),
            // A whole number of tokens per client.
            tokens: tokens.div_ceil(clients).max(1) * clients,
            threads: env_num("TL_BENCH_THREADS", 1).max(1),
            server_log: std::env::var("TL_BENCH_SERVER_LOG").ok(),
            dump: std::env::var_os("TL_BENCH_DUMP").map(PathBuf::from),
            bin: std::env::var_os("TL_BENCH_BIN").map_or_else(|| BIN.into(), PathBuf::from),
            replicas: match std::env::var("TL_BENCH_LEDGER").as_deref() {
                Ok("postgres") => Some(env_num("TL_BENCH_REPLICAS", 2).max(1)),
                Ok("redb") | Err(_) => None,
                Ok(other) => panic!("TL_BENCH_LEDGER={other:?}: use redb or postgres"),
            },
        }
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; everything else comes from the environment.
    let settings = Settings::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .enable_all()
        .build()
        .expect("building the load generator runtime");
    // Measured before the server starts, on an otherwise idle load generator.
    let calibration = calibrate();
    if rt.block_on(run(&settings, calibration)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs every phase and prints the report; true when nothing failed.
async fn run(s: &Settings, calibration: (f64, f64)) -> bool {
    let pg = s.replicas.map(|_| {
        let pg = postgres::Postgres::start();
        let url = pg.create_db("bench");
        (pg, url)
    });
    let mut server = start_server(s, pg.as_ref().map(|(_, url)| url.as_str()));
    let mut replicas: Vec<CaProcess> = (1..s.replicas.unwrap_or(1))
        .map(|_| {
            server.replica(
                &s.bin,
                &["--rate-limit", "0"],
                s.server_log.as_deref(),
                Duration::from_secs(20),
            )
        })
        .collect();
    let mut pids = vec![server.pid];
    pids.extend(replicas.iter().map(|r| r.pid));
    let meter = Meter::new(pids, pg.as_ref().map(|(pg, _)| pg.postmaster_pid()));
    let client = client(&server, server.api);
    let mut clients = vec![client.clone()];
    clients.extend(replicas.iter().map(|r| self::client(&server, r.api)));
    eprintln!(
        "server {} (pid {}) on {}{}; {} clients, load generator {} thread(s)",
        s.bin.display(),
        server.pid,
        server.api,
        match &pg {
            Some((_, url)) => format!(" and {} more replica(s), ledger {url}", replicas.len()),
            None => String::new(),
        },
        s.clients,
        s.threads
    );
    let workloads = bootstrap(&client, &server.admin_socket(), s.clients).await;
    let lanes = open_lanes(&clients, &workloads, true).await;

    eprintln!(
        "phase 1: closed loop, {:?} warm-up + {:?}",
        s.warmup, s.secs
    );
    let (lanes, max) = closed_loop(lanes, s, &meter).await;
    eprintln!("phase 2: {} req/s for {:?}", s.rate, s.secs);
    let (_lanes, fixed) = fixed_rate(lanes, s, &meter).await;
    eprintln!("phase 3: minting {} join tokens", s.tokens);
    let (first, mint_rate) = token_issuance(&clients, &server, &workloads, s, &meter).await;

    let answered: u64 = [&max, &fixed, &first]
        .iter()
        .map(|p| p.samples.all_ok())
        .sum();
    server.stop();
    for r in &mut replicas {
        r.stop();
    }
    if let Some(dir) = &s.dump {
        dump(dir, &server, &fixed.samples.timeline);
    }
    let recorded = match &pg {
        Some((_, url)) => pg_serials(url).await,
        None => ledger_serials(&server.data.join("ledger.redb")),
    };
    let expected = answered + workloads.len() as u64;

    let rows = [
        max.row("1. renewal, max throughput (closed loop)"),
        fixed.row(&format!("2. renewal at fixed {:.0}/s", s.rate)),
        first.row("3. first issuance, join token (closed loop)"),
    ];
    print_report(s, &rows, &fixed, mint_rate, calibration);
    let ledger_ok = recorded == expected;
    println!(
        "- ledger after SIGKILL holds {recorded} serials; {expected} were answered 200: {}",
        if ledger_ok { "ok" } else { "MISMATCH" }
    );
    for (row, phase) in rows.iter().zip([&max, &fixed, &first]) {
        for e in &phase.samples.errors {
            println!("- failure in {}: {e}", row.name);
        }
    }
    rows.iter().all(|r| r.failed == 0) && ledger_ok
}

/// The CA under test: `trustline ca serve` with `--rate-limit 0`, killed on drop (panics
/// included).
fn start_server(s: &Settings, ledger: Option<&str>) -> CaProcess {
    let log = s.server_log.as_deref();
    let mut args = vec!["--rate-limit", "0"];
    if let Some(url) = ledger {
        args.extend(["--ledger", url]);
    }
    let up_within = Duration::from_secs(20);
    CaProcess::start(
        &s.bin,
        TRUST_DOMAIN,
        "trustline-bench-",
        &args,
        log,
        up_within,
    )
}

/// A client of the CA at `api` trusting the root bundle `server`'s `ca init` wrote.
fn client(server: &CaProcess, api: std::net::SocketAddr) -> CaClient {
    let td = parse_trust_domain(TRUST_DOMAIN).expect("trust domain");
    let pem = std::fs::read(server.dir.path().join("root/bundle.pem")).expect("reading bundle");
    let bundle = Bundle::from_pem(td, &pem, "bundle.pem").expect("parsing bundle");
    CaClient::new(&format!("https://{api}"), bundle, Clock::system()).expect("CA client")
}

/// Writes phase 2's requests (in schedule order) and the server's log into `dir`.
fn dump(dir: &Path, server: &CaProcess, timeline: &[Timed]) {
    std::fs::create_dir_all(dir).expect("creating the dump directory");
    let mut rows: Vec<&Timed> = timeline.iter().collect();
    rows.sort_by_key(|t| t.due_us);
    let mut csv = String::from("due_us,lag_us,latency_us\n");
    for t in rows {
        csv.push_str(&format!("{},{},{}\n", t.due_us, t.lag_us, t.latency_us));
    }
    std::fs::write(dir.join("phase2.csv"), csv).expect("writing phase2.csv");
    std::fs::copy(server.log(), dir.join("server.log")).expect("copying server.log");
}

/// Counts the serials in the shared ledger.
async fn pg_serials(url: &str) -> u64 {
    let owner = trustline::ca::ledger::postgres::schema::Owner {
        trust_domain: TRUST_DOMAIN,
        region: "r1",
    };
    let ledger = PgLedger::open(
        PgUrl::parse(url).expect("ledger URL"),
        &owner,
        Default::default(),
    )
    .await
    .expect("opening the shared ledger");
    ledger.issued().await.expect("reading the ledger").len() as u64
}

/// Counts the serials in the ledger file (the server must be stopped).
fn ledger_serials(path: &Path) -> u64 {
    let ledger = RedbLedger::open(path).expect("reopening the ledger");
    ledger.issued().expect("reading the ledger").len() as u64
}

/// One benchmark identity: its first SVID and a CSR made before any timing.
struct Workload {
    id: SpiffeId,
    svid: Svid,
    csr: String,
}

/// Creates a join token for `id` through the admin socket.
async fn mint(socket: &Path, id: &SpiffeId) -> String {
    admin::token(socket, &id.to_string(), 3600)
        .await
        .unwrap_or_else(|e| panic!("no token for {id}: {e}"))
}

/// Gives each of `n` identities its first SVID (join token, full client-side verification).
async fn bootstrap(client: &CaClient, socket: &Path, n: usize) -> Vec<Workload> {
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let id = parse_workload_id(&format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/c{k}"))
            .expect("workload ID");
        let token = mint(socket, &id).await;
        let svid = client
            .issue_with_token(&id, &token)
            .await
            .unwrap_or_else(|e| panic!("bootstrapping {id}: {e}"));
        let (_key, csr) = make_csr(&id).expect("making a CSR");
        out.push(Workload { id, svid, csr });
    }
    out
}

/// One keep-alive connection and what it sends.
struct Lane {
    client: CaClient,
    svid: Option<Svid>,
    csr: String,
    conn: CaConnection,
}

/// Opens one connection per workload, presenting its SVID when `mtls`, alternating between
/// the replicas' `clients`.
async fn open_lanes(clients: &[CaClient], workloads: &[Workload], mtls: bool) -> Vec<Lane> {
    let mut lanes = Vec::with_capacity(workloads.len());
    for (k, w) in workloads.iter().enumerate() {
        let client = &clients[k % clients.len()];
        let svid = mtls.then(|| w.svid.clone());
        let conn = client
            .connect(svid.as_ref())
            .await
            .unwrap_or_else(|e| panic!("connecting for {}: {e}", w.id));
        lanes.push(Lane {
            client: client.clone(),
            svid,
            csr: w.csr.clone(),
            conn,
        });
    }
    lanes
}

impl Lane {
    /// Posts the CSR once; anything but 200 is an error. A broken connection is reopened.
    async fn post(&mut self, token: Option<&str>) -> Result<(), String> {
        match self.conn.post_csr(&self.csr, token).await {
            Ok((StatusCode::OK, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
            Err(e) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if let Ok(conn) = self.client.connect(self.svid.as_ref()).await {
                    self.conn = conn;
                }
                Err(e.to_string())
            }
        }
    }
}

/// One phase 2 request, in microseconds: when it was due (from the start of the measured
/// window), how late it was sent, and its latency from when it was due.
struct Timed {
    due_us: u64,
    lag_us: u64,
    latency_us: u64,
}

/// What one or more lanes observed.
#[derive(Default)]
struct Samples {
    /// Latencies of measured successful requests, in microseconds.
    latency_us: Vec<u64>,
    /// Phase 2: each measured request's schedule, send lag and latency.
    timeline: Vec<Timed>,
    ok: u64,
    warm_ok: u64,
    failed: u64,
    errors: Vec<String>,
    last_done: Option<Instant>,
}

impl Samples {
    /// Records one request; only `measured` ones count towards latency and rate.
    fn record(&mut self, result: Result<(), String>, latency: Duration, measured: bool) {
        match result {
            Ok(()) if measured => {
                self.ok += 1;
                self.latency_us.push(latency.as_micros() as u64);
                self.last_done = Some(Instant::now());
            }
            Ok(()) => self.warm_ok += 1,
            Err(e) => {
                self.failed += 1;
                if self.errors.len() < KEEP_ERRORS {
                    self.errors.push(e);
                }
            }
        }
    }

    fn merge(&mut self, other: Samples) {
        self.latency_us.extend(other.latency_us);
        self.timeline.extend(other.timeline);
        self.ok += other.ok;
        self.warm_ok += other.warm_ok;
        self.failed += other.failed;
        let room = KEEP_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(other.errors.into_iter().take(room));
        self.last_done = self.last_done.max(other.last_done);
    }

    /// Every 200 answer, warm-up included (each one is a serial in the ledger).
    fn all_ok(&self) -> u64 {
        self.ok + self.warm_ok
    }
}

/// Runs `work` on every lane in its own task and merges what they saw.
async fn run_lanes<F, Fut>(lanes: Vec<Lane>, work: F) -> (Vec<Lane>, Samples)
where
    F: Fn(usize, Lane) -> Fut,
    Fut: Future<Output = (Lane, Samples)> + Send + 'static,
{
    let tasks: Vec<_> = lanes
        .into_iter()
        .enumerate()
        .map(|(k, lane)| tokio::spawn(work(k, lane)))
        .collect();
    let mut lanes = Vec::with_capacity(tasks.len());
    let mut all = Samples::default();
    for t in tasks {
        let (lane, samples) = t.await.expect("a load task panicked");
        lanes.push(lane);
        all.merge(samples);
    }
    (lanes, all)
}

/// A finished phase: samples, the measured window and CPU use in it.
struct Phase {
    samples: Samples,
    window: Duration,
    used: Usage,
}

/// Phase 1: every lane posts back to back; only requests started in the window are measured.
async fn closed_loop(lanes: Vec<Lane>, s: &Settings, meter: &Meter) -> (Vec<Lane>, Phase) {
    let from = Instant::now() + s.warmup;
    let end = from + s.secs;
    let work = move |_k, mut lane: Lane| async move {
        let mut samples = Samples::default();
        loop {
            let start = Instant::now();
            if start >= end {
                break;
            }
            let r = lane.post(None).await;
            samples.record(r, start.elapsed(), start >= from);
        }
        (lane, samples)
    };
    let ((lanes, samples), used) = tokio::join!(run_lanes(lanes, work), meter.window(from, end));
    let phase = Phase {
        samples,
        window: s.secs,
        used,
    };
    (lanes, phase)
}

/// Phase 2: request `i` is due at `start + i / rate` on lane `i mod clients`; latency counts from
/// when it was due. One second of warm-up at the same rate.
async fn fixed_rate(lanes: Vec<Lane>, s: &Settings, meter: &Meter) -> (Vec<Lane>, Phase) {
    let clients = lanes.len();
    let rate = s.rate;
    let start = Instant::now() + Duration::from_millis(50);
    let from = start + Duration::from_secs(1);
    let end = from + s.secs;
    let work = move |k: usize, mut lane: Lane| async move {
        let mut samples = Samples::default();
        for i in (k..).step_by(clients) {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due).await;
            let sent = Instant::now();
            let r = lane.post(None).await;
            let measured = due >= from;
            let latency = due.elapsed();
            if measured && r.is_ok() {
                samples.timeline.push(Timed {
                    due_us: (due - from).as_micros() as u64,
                    lag_us: (sent - due).as_micros() as u64,
                    latency_us: latency.as_micros() as u64,
                });
            }
            samples.record(r, latency, measured);
        }
        (lane, samples)
    };
    let ((lanes, samples), used) = tokio::join!(run_lanes(lanes, work), meter.window(from, end));
    // If the server falls behind, the last answers come after `end`: the achieved rate shows it.
    let window = samples.last_done.map_or(s.secs, |t| t - from).max(s.secs);
    let phase = Phase {
        samples,
        window,
        used,
    };
    (lanes, phase)
}

/// Mints `per_lane` tokens for each workload, one minting task per workload; returns them and
/// the rate (tokens/s through the admin socket).
async fn mint_all(
    server: &CaProcess,
    workloads: &[Workload],
    per_lane: usize,
) -> (Vec<Vec<String>>, f64) {
    let started = Instant::now();
    let tasks: Vec<_> = workloads
        .iter()
        .map(|w| {
            let (socket, id) = (server.admin_socket(), w.id.clone());
            tokio::spawn(async move {
                let mut tokens = Vec::with_capacity(per_lane);
                for _ in 0..per_lane {
                    tokens.push(mint(&socket, &id).await);
                }
                tokens
            })
        })
        .collect();
    let mut tokens = Vec::with_capacity(tasks.len());
    for t in tasks {
        tokens.push(t.await.expect("a minting task panicked"));
    }
    let rate = (per_lane * workloads.len()) as f64 / started.elapsed().as_secs_f64();
    (tokens, rate)
}

/// Phase 3: mints `s.tokens` join tokens (concurrently, untimed), then spends each once over
/// fresh keep-alive connections without a client certificate. Returns the phase and the
/// minting rate (tokens/s through the admin socket).
async fn token_issuance(
    clients: &[CaClient],
    server: &CaProcess,
    workloads: &[Workload],
    s: &Settings,
    meter: &Meter,
) -> (Phase, f64) {
    let (tokens, mint_rate) = mint_all(server, workloads, s.tokens / workloads.len()).await;
    let lanes = open_lanes(clients, workloads, false).await;
    let tokens = std::sync::Arc::new(tokens);
    let mark = meter.mark();
    let started = Instant::now();
    let work = move |k: usize, mut lane: Lane| {
        let tokens = tokens.clone();
        async move {
            let mut samples = Samples::default();
            for t in &tokens[k] {
                let start = Instant::now();
                let r = lane.post(Some(t)).await;
                samples.record(r, start.elapsed(), true);
            }
            (lane, samples)
        }
    };
    let (_lanes, samples) = run_lanes(lanes, work).await;
    let phase = Phase {
        samples,
        window: started.elapsed(),
        used: meter.since(&mark),
    };
    (phase, mint_rate)
}

/// CPU time of the server and of this process (`/proc/PID/stat`), and the server's disk writes
/// (`/proc/PID/io`).
struct Meter {
    /// The CA replicas.
    servers: Vec<u32>,
    /// PostgreSQL's postmaster: it and its children count as server too.
    postmaster: Option<u32>,
    ticks_per_sec: f64,
}

/// A reading of both processes' CPU time and of the server's bytes written to storage.
struct Mark {
    /// Per server process: CPU ticks and bytes written.
    server: std::collections::HashMap<u32, (u64, u64)>,
    me: u64,
    at: Instant,
}

/// Resources used over a window: CPU in % of one core, server disk writes in bytes.
#[derive(Clone, Copy)]
struct Usage {
    server: f64,
    loadgen: f64,
    written: u64,
}

impl Meter {
    fn new(servers: Vec<u32>, postmaster: Option<u32>) -> Self {
        let hz = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        Meter {
            servers,
            postmaster,
            ticks_per_sec: hz,
        }
    }

    /// The server processes now: the replicas, and PostgreSQL's processes (its backends come
    /// and go with the replicas' connections).
    fn pids(&self) -> Vec<u32> {
        let mut pids = self.servers.clone();
        if let Some(pm) = self.postmaster {
            pids.push(pm);
            pids.extend(children_of(pm));
        }
        pids
    }

    fn mark(&self) -> Mark {
        Mark {
            server: self
                .pids()
                .into_iter()
                .map(|p| (p, (proc_ticks(&p.to_string()), proc_written(p))))
                .collect(),
            me: proc_ticks("self"),
            at: Instant::now(),
        }
    }

    fn since(&self, m: &Mark) -> Usage {
        let now = self.mark();
        let ticks = (now.at - m.at).as_secs_f64() * self.ticks_per_sec;
        let pct = |used: u64| used as f64 / ticks * 100.0;
        // A process started in the window counts from zero.
        let (mut cpu, mut written) = (0, 0);
        for (pid, (t, w)) in &now.server {
            let (t0, w0) = m.server.get(pid).copied().unwrap_or((0, 0));
            cpu += t.saturating_sub(t0);
            written += w.saturating_sub(w0);
        }
        Usage {
            server: pct(cpu),
            loadgen: pct(now.me.saturating_sub(m.me)),
            written,
        }
    }

    /// CPU use between `from` and `to` (sleeps until then).
    async fn window(&self, from: Instant, to: Instant) -> Usage {
        tokio::time::sleep_until(from).await;
        let mark = self.mark();
        tokio::time::sleep_until(to).await;
        self.since(&mark)
    }
}

/// utime + stime of a process (all threads), in clock ticks; 0 if unreadable.
fn proc_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends with the last ')': state is field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(1) == Some(&pid.to_string())
        })
        .collect()
}

/// Bytes a process caused to be written to storage; 0 if unreadable.
fn proc_written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One line of the report.
struct Row {
    name: String,
    requests: u64,
    failed: u64,
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    used: Usage,
}

/// The `p`-quantile (nearest rank) of sorted microseconds, in milliseconds.
fn quantile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

impl Phase {
    fn row(&self, name: &str) -> Row {
        let mut lat = self.samples.latency_us.clone();
        lat.sort_unstable();
        Row {
            name: name.to_string(),
            requests: self.samples.ok,
            failed: self.samples.failed,
            rate: self.samples.ok as f64 / self.window.as_secs_f64(),
            p50: quantile_ms(&lat, 0.50),
            p99: quantile_ms(&lat, 0.99),
            max: quantile_ms(&lat, 1.0),
            used: self.used,
        }
    }
}

/// How a figure compares with its goal.
fn verdict(met: bool, margin_pct: f64) -> String {
    let word = if met { "met" } else { "MISSED" };
    format!("{word} ({margin_pct:+.0} %)")
}

/// Prints the table and the verdicts on the goals.
fn print_report(
    s: &Settings,
    rows: &[Row],
    fixed: &Phase,
    mint_rate: f64,
    calibration: (f64, f64),
) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\n### CA issuance: {} keep-alive clients, {:?} per phase, {} cores shared by server and load generator\n",
        s.clients, s.secs, cores
    );
    println!("| phase | SVIDs | failed | SVIDs/s | p50 ms | p99 ms | max ms | server CPU | load gen CPU | server disk writes |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let per_svid_kib = r.used.written as f64 / 1024.0 / r.requests.max(1) as f64;
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} % | {:.0} % | {:.1} KiB/SVID |",
            r.name,
            r.requests,
            r.failed,
            r.rate,
            r.p50,
            r.p99,
            r.max,
            r.used.server,
            r.used.loadgen,
            per_svid_kib
        );
    }
    let mut lag: Vec<u64> = fixed.samples.timeline.iter().map(|t| t.lag_us).collect();
    lag.sort_unstable();
    println!(
        "\nPhase 2 send lag behind schedule (timer + load generator, included in its latency): p50 {:.2} ms, p99 {:.2} ms.",
        quantile_ms(&lag, 0.5),
        quantile_ms(&lag, 0.99)
    );
    print_stalls(&fixed.samples.timeline);
    println!(
        "Join tokens minted through the admin socket (untimed setup of phase 3): {mint_rate:.0}/s."
    );
    println!(
        "Machine speed before the run: ECDSA P-256 sign {:.1} µs, verify {:.1} µs (one core).",
        calibration.0, calibration.1
    );
    println!("CPU is in % of one core (200 % = both cores).\n");
    let tput = rows[0].rate;
    println!(
        "- max throughput {tput:.0}/s vs goal >= {GOAL_THROUGHPUT:.0}/s: {}",
        verdict(
            tput >= GOAL_THROUGHPUT,
            (tput / GOAL_THROUGHPUT - 1.0) * 100.0
        )
    );
    let p99 = rows[1].p99;
    println!(
        "- p99 {p99:.2} ms at {:.0}/s vs goal < {GOAL_P99_MS} ms: {}",
        s.rate,
        verdict(p99 < GOAL_P99_MS, (1.0 - p99 / GOAL_P99_MS) * 100.0)
    );
}

/// Prints the bursts of phase 2 requests slower than the p99 goal: when, how many, how slow.
fn print_stalls(timeline: &[Timed]) {
    let goal_us = (GOAL_P99_MS * 1000.0) as u64;
    let mut slow: Vec<&Timed> = timeline
        .iter()
        .filter(|t| t.latency_us >= goal_us)
        .collect();
    slow.sort_by_key(|t| t.due_us);
    // (first due, count, worst latency); a gap of 250 ms starts a new burst.
    let mut bursts: Vec<(u64, usize, u64)> = Vec::new();
    let mut last_due = 0;
    for t in slow {
        match bursts.last_mut() {
            Some(b) if t.due_us - last_due < 250_000 => {
                b.1 += 1;
                b.2 = b.2.max(t.latency_us);
            }
            _ => bursts.push((t.due_us, 1, t.latency_us)),
        }
        last_due = t.due_us;
    }
    let shown: Vec<String> = bursts
        .iter()
        .take(8)
        .map(|(at, n, worst)| {
            format!(
                "+{:.2} s: {n} (worst {:.1} ms)",
                *at as f64 / 1e6,
                *worst as f64 / 1e3
            )
        })
        .collect();
    println!(
        "Phase 2 requests over {GOAL_P99_MS} ms: {} in {} burst(s){}{}.",
        bursts.iter().map(|b| b.1).sum::<usize>(),
        bursts.len(),
        if shown.is_empty() { "" } else { ": " },
        shown.join(", ")
    );
}

/// Single-core speed of this machine right now: microseconds per ECDSA P-256 sign and verify
/// (the two operations that dominate issuance), so runs at different times can be compared.
fn calibrate() -> (f64, f64) {
    use aws_lc_rs::signature::{
        EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
        ECDSA_P256_SHA256_ASN1_SIGNING,
    };
    const N: u32 = 2000;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("P-256 key");
    let msg = [7u8; 300];
    let started = std::time::Instant::now();
    let mut sig = key.sign(&rng, &msg).expect("signing");
    for _ in 1..N {
        sig = key.sign(&rng, &msg).expect("signing");
    }
    let sign_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(N);
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    let started = std::time::Instant::now();
    for _ in 0..N {
        public.verify(&msg, sig.as_ref()).expect("verifying");
    }
    let verify_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(N);
    (sign_us, verify_us)
}
