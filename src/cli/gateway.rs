//! `trustline gateway`: the regional gateway.

use trustline::clock::Clock;
use trustline::tunnel::config::GatewayConfig;

/// Runs the gateway until SIGTERM or Ctrl-C, then closes its connections.
pub async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    let bound = trustline::tunnel::gateway::build(config, Clock::system())
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "trustline gateway {}: QUIC on {}, admin http://{}/paths",
        bound.identity.id(),
        bound.listen,
        bound.admin
    );
    super::wait_for_signal().await?;
    bound.shutdown().await;
    Ok(())
}
