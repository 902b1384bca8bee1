//! `trustline wan-relay`: an emulated WAN (delay, UDP loss) between two regions.

use anyhow::Context;
use clap::Args;
use trustline::util::parse_duration;

#[derive(Args)]
pub struct WanRelayArgs {
    /// Address to listen on (TCP and/or UDP, the same port number).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Address to relay to.
    #[arg(long)]
    to: std::net::SocketAddr,
    /// One-way delay added in each direction (RTT = 2 x delay), at most 10s, e.g. 75ms.
    #[arg(long)]
    delay: String,
    /// Which protocols to relay.
    #[arg(long, value_enum, default_value_t = WanProto::Both)]
    proto: WanProto,
    /// Probability of dropping a UDP datagram, in each direction (0 to 1).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    loss: f64,
    /// Seed of the loss generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum WanProto {
    Tcp,
    Udp,
    Both,
}

/// Relays until SIGTERM or Ctrl-C.
pub async fn run(a: WanRelayArgs) -> anyhow::Result<()> {
    use trustline::wan::{self, WanSpec};
    let delay = parse_duration(&a.delay)
        .map_err(anyhow::Error::msg)
        .context("--delay")?;
    let spec = WanSpec {
        delay,
        udp_loss: a.loss,
        seed: a.seed,
    };
    spec.check().map_err(|e| {
        let flag = match e {
            wan::SpecError::Loss(_) => "--loss",
            wan::SpecError::Delay(_) => "--delay",
        };
        anyhow::anyhow!("{flag}: {e}")
    })?;
    // TCP first, so that UDP takes the same port when --listen asks for port 0.
    let tcp = match a.proto {
        WanProto::Udp => None,
        _ => Some(
            wan::spawn_tcp(a.listen, a.to, spec)
                .await
                .context("TCP relay")?,
        ),
    };
    let listen = tcp.as_ref().map_or(a.listen, |t| t.local_addr());
    let udp = match a.proto {
        WanProto::Tcp => None,
        _ => Some(
            wan::spawn_udp(listen, a.to, spec)
                .await
                .context("UDP relay")?,
        ),
    };
    tracing::info!(
        %listen,
        to = %a.to,
        tcp = tcp.is_some(),
        udp = udp.is_some(),
        delay = %humantime::format_duration(delay),
        rtt = %humantime::format_duration(spec.rtt()),
        loss = a.loss,
        seed = a.seed,
        "wan relay running"
    );
    super::wait_for_signal().await?;
    tracing::info!("stopping");
    Ok(())
}
