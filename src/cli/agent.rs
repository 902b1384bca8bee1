//! `trustline agent`: the Workload API for a host's processes, and `trustline agent fetch`, what
//! a caller on this host gets from it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio_stream::StreamExt as _;
use trustline::agent::client::{split_certs, Client};
use trustline::agent::config::AgentConfig;
use trustline::clock::Clock;
use trustline::identity::inspect_cert;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// Configuration file (TOML); runs the agent.
    #[arg(long, required = false)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Calls a Workload API as this process and prints what it is given (like
    /// `spire-agent api fetch`): the X.509-SVIDs, or JWT-SVIDs with --jwt-audience.
    #[command(
        after_help = "Examples:\n  trustline agent fetch --socket /run/trustline/agent.sock\n  trustline agent fetch --socket /run/trustline/agent.sock --jwt-audience https://api.example.org"
    )]
    Fetch(FetchArgs),
}

#[derive(Args)]
struct FetchArgs {
    /// The Workload API socket.
    #[arg(long, default_value = trustline::agent::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Fetch JWT-SVIDs for this audience instead of X.509-SVIDs (repeat for several).
    #[arg(long)]
    jwt_audience: Vec<String>,
    /// With --jwt-audience: only this SPIFFE ID's JWT-SVID.
    #[arg(long, default_value = "")]
    spiffe_id: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "10s", value_parser = trustline::util::parse_duration)]
    timeout: Duration,
}

/// Runs `trustline agent ...`.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    match (args.command, args.config) {
        (Some(AgentCommand::Fetch(f)), _) => fetch(f).await,
        (None, Some(config)) => serve(&config).await,
        (None, None) => {
            anyhow::bail!("give --config FILE to run the agent, or a subcommand (fetch)")
        }
    }
}

async fn serve(file: &Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(file)?;
    let bound = trustline::agent::build(config, Clock::system()).await?;
    println!(
        "trustline agent {}: Workload API on unix://{}",
        bound.identity.id(),
        bound.socket.display()
    );
    super::wait_for_signal().await?;
    tracing::info!("stopping");
    bound.stop().await;
    Ok(())
}

async fn fetch(a: FetchArgs) -> anyhow::Result<()> {
    let call = async {
        let mut client = Client::connect(&a.socket).await?;
        if a.jwt_audience.is_empty() {
            fetch_x509(&mut client).await
        } else {
            fetch_jwt(&mut client, a.jwt_audience.clone(), a.spiffe_id.clone()).await
        }
    };
    tokio::time::timeout(a.timeout, call)
        .await
        .with_context(|| format!("no answer within {:?}", a.timeout))?
}

/// The first FetchX509SVID message: each SVID's ID, serial and expiry.
async fn fetch_x509(client: &mut Client) -> anyhow::Result<()> {
    let mut stream = client.x509_svids().await.map_err(status)?;
    let msg = stream
        .next()
        .await
        .context("the stream ended without a message")?
        .map_err(status)?;
    println!("received {} X.509-SVID(s)", msg.svids.len());
    for s in &msg.svids {
        let chain = split_certs(&s.x509_svid).map_err(anyhow::Error::msg)?;
        let leaf = chain.first().map(inspect_cert).transpose()?;
        println!("spiffe_id: {}", s.spiffe_id);
        if let Some(leaf) = leaf {
            println!("  serial: {}", leaf.serial);
            println!("  not_after: {}", trustline::clock::rfc3339(leaf.not_after));
        }
        println!("  certificates: {}", chain.len());
        println!("  bundle bytes: {}", s.bundle.len());
    }
    Ok(())
}

async fn fetch_jwt(client: &mut Client, audience: Vec<String>, id: String) -> anyhow::Result<()> {
    let r = client.jwt_svids(audience, id).await.map_err(status)?;
    println!("received {} JWT-SVID(s)", r.svids.len());
    for s in &r.svids {
        println!("spiffe_id: {}", s.spiffe_id);
        println!("  token: {}", s.svid);
    }
    Ok(())
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
