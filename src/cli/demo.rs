//! `trustline demo`: a whole mesh on loopback.

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    trustline::demo::run().await
}
