//! The identity task: obtains this workload's SVID, validates it against the bundle, publishes it
//! for every new handshake, renews it before it expires, and keeps the revocation list fresh.
//!
//! Rotation is one task. Publishing swaps an `Arc` that the TLS resolvers read per handshake, so
//! existing connections keep the certificate they were opened with and are never dropped.
//! Renewal happens at 50 % ±10 % of the remaining lifetime; on failure the valid SVID keeps
//! serving while retries back off exponentially up to [`BACKOFF_CAP`], never more than half the
//! remaining lifetime apart (so a CA back shortly before expiry is still reached in time). When the SVID expires
//! without a successor, it is withdrawn: new handshakes fail and readiness goes false.
//!
//! Files: `handle.rs` (the [`Identity`] handle the roles hold, expiry, [`renewal_delay`]),
//! `ca.rs` (the `ca` source, over [`Issuer`], which [`CaClient`] implements), `files.rs` and
//! `workload_api.rs` (the other two sources), `error.rs` ([`Error`]).

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::clock::Clock;
use crate::identity::{Bundle, SpiffeId};
use crate::region::Region;
use ca_client::CaClient;

mod ca;
pub mod ca_client;
pub mod config;
mod error;
mod files;
mod handle;
mod jwt_bundle;
mod workload_api;

#[cfg(test)]
mod tests;

pub use ca::{fetch_revoked, parse_revoked, rotation_loop, Issuer, Obtain};
pub use error::Error;
pub use files::load_svid_files;
pub use handle::{renewal_delay, renewal_delay_with, Identity, Jitter};

/// Longest wait between renewal attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(150);
const BACKOFF_START: Duration = Duration::from_secs(1);
/// Shortest wait between renewal attempts near the SVID's expiry, where the back-off is cut to
/// half the remaining lifetime.
pub const RETRY_FLOOR: Duration = Duration::from_millis(500);

/// Where the SVID comes from.
#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// The trustline CA: first SVID with a join token, renewals over mTLS.
    Ca {
        url: String,
        token_file: PathBuf,
        /// The region whose CA this is (the role's own `region`). When set, the CA server's
        /// certificate must be issued by that region's CA, and the roots the CA publishes are
        /// trusted; when not, any CA of the trust domain is accepted and only the configured
        /// roots are kept from its bundle.
        region: Option<Region>,
    },
    /// PEM files written by something else (cert-manager, spiffe-helper), reloaded on change.
    Files {
        cert: PathBuf,
        key: PathBuf,
        poll: Duration,
    },
    /// A SPIFFE Workload API (a SPIRE agent): the X.509 stream, followed across reconnections.
    WorkloadApi {
        endpoint: spiffe::transport::Endpoint,
    },
}

/// What the identity task needs.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    pub id: SpiffeId,
    pub bundle: Bundle,
    pub source: IdentitySource,
    /// How often the revocation list is fetched (CA source).
    pub refresh: Duration,
    /// Where in the 50 % ±10 % window the CA source renews: random (the default, and the only
    /// choice a config file has); fixed by tests that need exact timing.
    pub jitter: Jitter,
}

/// Starts the identity task for `config`; it ends when `shutdown` changes.
pub fn start(
    config: IdentityConfig,
    clock: Clock,
    shutdown: watch::Receiver<bool>,
) -> Result<std::sync::Arc<Identity>, Error> {
    let identity = Identity::new(config.id.clone(), config.bundle.clone(), clock.clone())?;
    let span = tracing::info_span!("identity", id = %config.id);
    match &config.source {
        IdentitySource::Ca {
            url,
            token_file,
            region,
        } => {
            // The CA is verified against the bundle in force (configured roots plus, from our
            // own region's CA, the roots it publishes): after a root rotation the CA's
            // certificate and the chains it returns come from the new root.
            let client = CaClient::new(url, config.bundle.clone(), clock).map(|c| {
                let c = c.with_trust(identity.trust());
                match region {
                    Some(r) => c.expect_region(r.clone()),
                    None => c,
                }
            });
            match client {
                Ok(client) => {
                    tokio::spawn(
                        ca::ca_loop(
                            identity.clone(),
                            client.clone(),
                            token_file.clone(),
                            config.jitter,
                            shutdown.clone(),
                        )
                        .instrument(span.clone()),
                    );
                    let jwt = jwt_bundle::refresh_loop(
                        identity.clone(),
                        client.clone(),
                        config.refresh,
                        shutdown.clone(),
                    );
                    tokio::spawn(jwt.instrument(span.clone()));
                    tokio::spawn(
                        ca::refresh_loop(identity.clone(), client, config.refresh, shutdown)
                            .instrument(span),
                    );
                }
                Err(e) => {
                    tracing::error!(parent: &span, error = %e, "identity source unusable; no SVID will be obtained")
                }
            }
        }
        IdentitySource::Files { cert, key, poll } => {
            tokio::spawn(
                files::files_loop(identity.clone(), cert.clone(), key.clone(), *poll, shutdown)
                    .instrument(span),
            );
        }
        IdentitySource::WorkloadApi { endpoint } => {
            tokio::spawn(
                workload_api::run(identity.clone(), endpoint.clone(), shutdown).instrument(span),
            );
        }
    }
    Ok(identity)
}

/// Sleeps `d`; false when `shutdown` changed first.
async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.changed() => false,
    }
}
