//! The `trustline` binary: parse the command line, load and validate configuration, call the
//! role. Errors become one clear message and a non-zero exit code. Each role's command line is
//! in its own file under `cli/`.
#![deny(clippy::unwrap_used)]
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;
use trustline::proxy::config::SidecarConfig;
use trustline::tunnel::config::GatewayConfig;

use cli::{Cli, Command};

/// jemalloc with background threads: it gives memory back after a flood, which glibc's malloc
/// does not (RELIABILITY.md, "Memory").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What runs on the runtime. The sidecar's and the gateway's configs are loaded before it
/// starts: they say how many worker threads it gets.
#[allow(clippy::large_enum_variant)] // one value, made once
enum Job {
    Sidecar(SidecarConfig),
    Gateway(GatewayConfig),
    Other(Command),
}

impl Job {
    /// Fails with the config's error (`main` prints its message alone, not a chain).
    fn load(command: Command) -> anyhow::Result<Self> {
        Ok(match command {
            Command::Sidecar(a) => Job::Sidecar(SidecarConfig::load(&a.config)?),
            Command::Gateway(a) => Job::Gateway(GatewayConfig::load(&a.config)?),
            other => Job::Other(other),
        })
    }

    fn workers(&self) -> Option<usize> {
        match self {
            Job::Sidecar(c) => Some(c.workers),
            Job::Gateway(c) => Some(c.workers),
            Job::Other(_) => None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let job = match Job::load(cli.command) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The demo prints its own story; its components only log warnings unless RUST_LOG says more.
    let demo = matches!(job, Job::Other(Command::Demo));
    cli::init_logging(if demo { "warn" } else { "info" });
    match trustline::limits::raise_nofile_limit() {
        Ok(l) => {
            tracing::info!(before = ?l.before, now = ?l.now, hard = ?l.hard, "open-file limit")
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let rt = match runtime(job.workers()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match job {
        Job::Sidecar(config) => rt.block_on(cli::sidecar::run(config)),
        Job::Gateway(config) => rt.block_on(cli::gateway::run(config)),
        Job::Other(command) => rt.block_on(cli::run(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime for `workers` threads (the default when the command does not say).
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    // A sidecar with one worker runs on the current thread: no cross-thread hand-offs.
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}
