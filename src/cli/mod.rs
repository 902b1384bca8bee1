//! The command line: one file per role (or family of subcommands), each with its arguments and
//! the glue that runs it. `anyhow` lives here and in `main.rs` only: the roles return their own
//! error types, and this edge turns them into one message and an exit code.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub mod agent;
pub mod ca;
pub mod demo;
pub mod gateway;
pub mod jwt;
pub mod policy;
pub mod redirect;
pub mod sidecar;
pub mod wan;

#[derive(Parser)]
#[command(
    name = "trustline",
    version,
    about = "Zero-trust service-mesh data plane: SPIFFE mTLS 1.3 sidecar, CA and gateways"
)]
#[command(
    after_help = "Examples:\n  trustline demo                       run a whole mesh on loopback\n  trustline ca init --trust-domain example.org --out ca/root\n  trustline ca serve --ca ca/root --data ca/data --listen 127.0.0.1:8443"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The certificate authority: init, serve, token, revoke, rotate.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// The SPIFFE Workload API for the processes of this host: attests each caller by its
    /// kernel credentials and serves the SVIDs its registration entries grant.
    #[command(
        after_help = "Examples:\n  trustline agent --config /etc/trustline/agent.toml\n  trustline agent fetch --socket /run/trustline/agent.sock\n\nSee config/agent.toml for an annotated example."
    )]
    Agent(agent::AgentArgs),
    /// Runs a whole mesh on loopback and prints what happens.
    Demo,
    /// The per-workload proxy: inbound and outbound mTLS 1.3 with SPIFFE identities.
    #[command(
        after_help = "Example:\n  trustline sidecar --config /etc/trustline/sidecar.toml\n\nSee config/sidecar-*.toml for annotated examples."
    )]
    Sidecar(ConfigArgs),
    /// The regional gateway: joins regions with warm QUIC (mTLS 1.3) tunnels; never terminates
    /// the workloads' mTLS.
    #[command(
        after_help = "Example:\n  trustline gateway --config /etc/trustline/gateway.toml\n\nSee config/gateway-*.toml for annotated examples."
    )]
    Gateway(ConfigArgs),
    /// Installs (or prints, or removes) the iptables rules that send a pod's TCP through the sidecar.
    #[command(
        after_help = "Examples:\n  trustline redirect --proxy-uid 1337 --dry-run\n  trustline redirect --proxy-uid 1337 --exclude-inbound-ports 8443\n  trustline redirect --remove"
    )]
    Redirect(trustline::proxy::redirect::RedirectArgs),
    /// JWT-SVIDs: validate.
    #[command(subcommand)]
    Jwt(jwt::JwtCommand),
    /// Policy files: check, explain.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Relays TCP and UDP with an added one-way delay (and UDP loss): a WAN between two regions.
    #[command(
        after_help = "Example (150 ms RTT in front of a gateway on 127.0.0.1:4433):\n  trustline wan-relay --listen 127.0.0.1:5433 --to 127.0.0.1:4433 --delay 75ms --loss 0.01\n\nTCP pays the handshake too: a client's first bytes arrive 3 delays after it connects."
    )]
    WanRelay(wan::WanRelayArgs),
}

/// The arguments of a role that runs from one configuration file (sidecar, gateway).
#[derive(Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: PathBuf,
}

/// Runs a command other than `sidecar` and `gateway` (those are started by `main` once their
/// configuration has sized the runtime).
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo => demo::run().await,
        Command::Sidecar(_) | Command::Gateway(_) => {
            unreachable!("handled before the runtime starts")
        }
        Command::Redirect(a) => redirect::run(&a),
        Command::Policy(c) => policy::run(c),
        Command::Jwt(c) => jwt::run(c),
        Command::WanRelay(a) => wan::run(a).await,
        Command::Ca(c) => ca::run(c).await,
        Command::Agent(a) => agent::run(a).await,
    }
}

/// Logs go to stderr at `default_level` unless `RUST_LOG` says otherwise.
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
