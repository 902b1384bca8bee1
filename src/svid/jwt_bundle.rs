//! The sidecar's JWT bundles: the keys that verify the JWT-SVIDs its policy reads, fetched from
//! its CA's SPIFFE bundle document (`GET /v1/bundle`, `Accept: application/json`), which
//! carries every region's current `jwt-svid` keys.
//!
//! The loop fetches at start, then every refresh interval (sooner if the document's non-zero
//! `spiffe_refresh_hint` says so, never more often than [`MIN_REFRESH`]); a failed fetch or a
//! document that does not parse keeps the last good bundles, retried with a back-off, so a
//! region cut off from its CA keeps validating with the keys it has.
//!
//! A key's region is believed only from a CA whose region was checked in the handshake (our
//! own region's CA, as for the roots in [`super::ca`]): otherwise any region's CA could be
//! answering and label its own key with another region's name, so the keys are kept without
//! their regions (tokens then have no verified region and never match a rule's `regions`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::watch;

use super::ca_client::{CaClient, CaRegion, ClientError};
use super::handle::Identity;
use super::{sleep_or_stop, BACKOFF_START};
use crate::identity::Svid;
use crate::jwt::{JwtBundle, JwtBundles, JwtError};

/// The shortest wait between two fetches, whatever the refresh hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// The JWT bundles an [`Identity`] holds, and how often they were fetched.
#[derive(Default)]
pub(super) struct JwtBundleState {
    bundles: ArcSwap<JwtBundles>,
    fetches: AtomicU64,
    failures: AtomicU64,
    /// The warning about an unchecked CA's key regions was logged.
    warned_unchecked: AtomicBool,
}

impl Identity {
    /// The JWT bundles in force (our trust domain's from the CA, and any others set).
    pub fn jwt_bundles(&self) -> Arc<JwtBundles> {
        self.jwt.bundles.load_full()
    }

    /// Replaces one trust domain's JWT bundle (the others are kept).
    pub fn set_jwt_bundle(&self, bundle: JwtBundle) {
        self.jwt.bundles.rcu(|current| {
            let mut next = JwtBundles::clone(current);
            next.insert(bundle.clone());
            next
        });
    }

    /// How many times our trust domain's JWT bundle was fetched from the CA (successfully).
    pub fn jwt_bundle_fetches(&self) -> u64 {
        self.jwt.fetches.load(Ordering::Relaxed)
    }

    /// How many fetches of the JWT bundle failed (the last good bundle was kept each time).
    pub fn jwt_bundle_failures(&self) -> u64 {
        self.jwt.failures.load(Ordering::Relaxed)
    }
}

/// Where the SPIFFE bundle document comes from ([`CaClient`]; a fake in unit tests).
pub(super) trait BundleSource: Send + Sync + 'static {
    /// The document's bytes, fetched with `client` as the TLS client certificate if given.
    fn fetch(
        &self,
        client: Option<&Svid>,
    ) -> impl Future<Output = Result<Bytes, ClientError>> + Send;
    /// Whether the answering CA's region was checked in the handshake.
    fn region_checked(&self) -> bool;
}

impl BundleSource for CaClient {
    async fn fetch(&self, client: Option<&Svid>) -> Result<Bytes, ClientError> {
        self.fetch_bundle_json(client).await
    }

    fn region_checked(&self) -> bool {
        matches!(self.region(), CaRegion::Is(_))
    }
}

/// Why a fetch brought no new bundle.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("fetching the CA's bundle document: {0}")]
    Fetch(#[from] ClientError),
    #[error("the CA's bundle document: {0}")]
    Parse(#[from] JwtError),
}

/// Fetches our trust domain's JWT bundle every `every` until `shutdown` changes.
pub(super) async fn refresh_loop(
    identity: Arc<Identity>,
    source: impl BundleSource,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = every.max(MIN_REFRESH);
    let mut backoff = BACKOFF_START;
    let mut failing = false;
    loop {
        let wait = match refresh(&identity, &source).await {
            Ok(hint) => {
                if failing {
                    tracing::info!("JWT bundle fetched again");
                }
                failing = false;
                backoff = BACKOFF_START;
                match hint {
                    // A hint of 0 s says nothing useful: the interval.
                    Some(h) if !h.is_zero() => h.clamp(MIN_REFRESH, every),
                    _ => every,
                }
            }
            Err(e) => {
                identity.jwt.failures.fetch_add(1, Ordering::Relaxed);
                // The first failure of a run is a warning, the retries are not.
                if failing {
                    tracing::debug!(error = %e, "JWT bundle fetch failed again; keeping the last one");
                } else {
                    tracing::warn!(error = %e, "JWT bundle fetch failed; keeping the last one");
                }
                failing = true;
                let wait = backoff.min(every);
                backoff = (backoff * 2).min(every);
                wait
            }
        };
        if !sleep_or_stop(wait, &mut shutdown).await {
            return;
        }
    }
}

/// One fetch: our trust domain's JWT keys from the document, published; the refresh hint.
async fn refresh(
    identity: &Identity,
    source: &impl BundleSource,
) -> Result<Option<Duration>, FetchError> {
    let current = identity.current();
    let body = source.fetch(current.as_deref()).await?;
    let td = identity.id().trust_domain();
    let doc = crate::jwt::parse_spiffe_bundle(td, &body)?;
    let mut jwt = doc.jwt;
    if !source.region_checked() && jwt.keys().any(|k| k.region().is_some()) {
        if !identity.jwt.warned_unchecked.swap(true, Ordering::Relaxed) {
            tracing::warn!("the CA's region was not checked (set the role's `region`): its JWT keys are used without their regions, so tokens have no verified region");
        }
        let mut plain = JwtBundle::new(td.clone());
        for k in jwt.keys() {
            plain.insert(k.clone().with_region(None))?;
        }
        jwt = plain;
    }
    let keys = jwt.len();
    identity.set_jwt_bundle(jwt);
    identity.jwt.fetches.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(keys, "JWT bundle refreshed");
    Ok(doc.refresh_hint)
}

#[cfg(test)]
mod tests;
