//! `trustline sidecar`: the per-workload proxy.

use trustline::clock::Clock;
use trustline::proxy::config::SidecarConfig;

/// Runs the sidecar until SIGTERM or Ctrl-C, then drains it.
pub async fn run(config: SidecarConfig) -> anyhow::Result<()> {
    let drain = config.drain_timeout;
    let bound = trustline::proxy::build(config, Clock::system()).await?;
    println!(
        "trustline sidecar {}: admin http://{}/readyz",
        bound.identity.id(),
        bound.admin
    );
    super::wait_for_signal().await?;
    tracing::info!(open = bound.active_connections(), deadline = ?drain, "draining");
    let cut = bound.drain(drain).await;
    tracing::info!(cut_off = cut, "drained");
    Ok(())
}
