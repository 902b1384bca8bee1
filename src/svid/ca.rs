//! The `ca` source: the first SVID with a join token, renewals over mTLS at about half-life, and
//! the revocation list and trust bundle refreshed every interval.
//!
//! The loops talk to the CA through [`Issuer`], which [`CaClient`] implements over HTTPS, so the
//! rotation task runs against a fake CA in unit tests (on tokio's paused time).

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use super::ca_client::{CaClient, CaRegion};
use super::handle::{expire_if_due, renewal_delay_with, Identity, Jitter};
use super::{sleep_or_stop, Error, BACKOFF_CAP, BACKOFF_START, RETRY_FLOOR};
use crate::clock::rfc3339;
use crate::identity::{Serial, SpiffeId, Svid};

/// What the rotation task needs from the CA.
pub trait Issuer: Send + Sync + 'static {
    /// First issuance: a new key and an SVID for `id`, authorised by a join token.
    fn issue(&self, id: &SpiffeId, token: &str)
        -> impl Future<Output = Result<Svid, Error>> + Send;
    /// Renewal: a new key and SVID, authorised by the current one.
    fn renew(&self, current: &Svid) -> impl Future<Output = Result<Svid, Error>> + Send;
    /// The roots the CA publishes.
    fn bundle(&self) -> impl Future<Output = Result<Vec<CertificateDer<'static>>, Error>> + Send;
    /// The serials the CA has revoked.
    fn revoked(&self) -> impl Future<Output = Result<HashSet<Serial>, Error>> + Send;
    /// Whether the CA's region was checked in the handshake ([`CaClient::expect_region`]), which
    /// makes the roots it publishes authoritative for our trust domain.
    fn region_checked(&self) -> bool;
}

impl Issuer for CaClient {
    async fn issue(&self, id: &SpiffeId, token: &str) -> Result<Svid, Error> {
        Ok(self.issue_with_token(id, token).await?)
    }

    async fn renew(&self, current: &Svid) -> Result<Svid, Error> {
        Ok(CaClient::renew(self, current).await?)
    }

    async fn bundle(&self) -> Result<Vec<CertificateDer<'static>>, Error> {
        let pem = self.fetch_bundle_pem().await?;
        crate::identity::certs_from_pem(&pem, "CA bundle").map_err(Error::CaBundle)
    }

    async fn revoked(&self) -> Result<HashSet<Serial>, Error> {
        fetch_revoked(self).await
    }

    fn region_checked(&self) -> bool {
        matches!(self.region(), CaRegion::Is(_))
    }
}

/// One way of obtaining an SVID for an identity: the first one (`current` is `None`) or the
/// successor of `current`. The `ca` source is one ([`CaSteps`]); a host agent obtaining its
/// workloads' SVIDs with its own is another (`crate::agent`).
pub trait Obtain: Send + Sync + 'static {
    fn obtain(
        &self,
        current: Option<Arc<Svid>>,
    ) -> impl Future<Output = Result<Svid, Error>> + Send;
}

/// The `ca` source's steps: a join token for the first SVID, mTLS renewals after.
struct CaSteps<I> {
    issuer: I,
    id: SpiffeId,
    token_file: PathBuf,
}

impl<I: Issuer> Obtain for CaSteps<I> {
    async fn obtain(&self, current: Option<Arc<Svid>>) -> Result<Svid, Error> {
        match current {
            None => first_svid(&self.id, &self.issuer, &self.token_file).await,
            Some(cur) => self.issuer.renew(&cur).await,
        }
    }
}

/// Obtains and renews the SVID until `shutdown` changes (the `ca` source, [`rotation_loop`]).
pub(super) async fn ca_loop(
    identity: Arc<Identity>,
    issuer: impl Issuer,
    token_file: PathBuf,
    jitter: Jitter,
    shutdown: watch::Receiver<bool>,
) {
    let steps = CaSteps {
        issuer,
        id: identity.id().clone(),
        token_file,
    };
    rotation_loop(identity, steps, jitter, shutdown).await
}

/// Obtains and renews `identity`'s SVID through `source` until `shutdown` changes: renewal at
/// `jitter`'s point of 50 % ±10 % of the remaining lifetime; on failure the current SVID keeps
/// serving while retries back off from [`BACKOFF_START`] to [`BACKOFF_CAP`] (and at most half
/// the remaining lifetime apart, [`retry_wait`]), and it is withdrawn at its expiry.
pub async fn rotation_loop(
    identity: Arc<Identity>,
    source: impl Obtain,
    jitter: Jitter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let attempt = source.obtain(identity.current()).await;
        let wait = match attempt.and_then(|svid| {
            let not_after = svid.info.not_after;
            let serial = svid.info.serial.clone();
            identity.publish(svid).map(|()| (not_after, serial))
        }) {
            Ok((not_after, serial)) => {
                backoff = BACKOFF_START;
                tracing::info!(%serial, not_after = %rfc3339(not_after), "SVID published");
                renewal_delay_with(jitter, identity.clock.now(), not_after)
            }
            Err(e) => {
                let wait = retry_wait(backoff, identity.until_expiry());
                backoff = (backoff * 2).min(BACKOFF_CAP);
                expire_if_due(&identity);
                tracing::warn!(error = %e, retry_in = ?wait, "obtaining an SVID failed; the current one (if any) keeps serving");
                wait
            }
        };
        // Wake early if the current SVID expires before the next attempt.
        let wait = identity.until_expiry().map_or(wait, |e| wait.min(e));
        if !sleep_or_stop(wait, &mut shutdown).await {
            return;
        }
        expire_if_due(&identity);
    }
}

/// The wait before retrying a failed renewal: the back-off, but never more than half of what
/// is left of the SVID (and at least [`RETRY_FLOOR`]), so retries keep coming until it expires.
/// A CA back in the last back-off interval before expiry is still used in time: once the SVID
/// expires, its join token is spent and the sidecar cannot rejoin alone.
fn retry_wait(backoff: Duration, until_expiry: Option<Duration>) -> Duration {
    match until_expiry {
        Some(left) => backoff.min((left / 2).max(RETRY_FLOOR)),
        None => backoff,
    }
}

async fn first_svid(id: &SpiffeId, issuer: &impl Issuer, token_file: &Path) -> Result<Svid, Error> {
    let token = std::fs::read_to_string(token_file).map_err(|source| Error::TokenFile {
        path: token_file.to_path_buf(),
        source,
    })?;
    issuer.issue(id, token.trim()).await
}

/// Refreshes the revocation list and the trust bundle from the CA every `every`.
pub(super) async fn refresh_loop(
    identity: Arc<Identity>,
    issuer: impl Issuer,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match issuer.revoked().await {
            Ok(set) => {
                identity.set_revoked(set);
                let now = crate::clock::unix_secs(identity.clock.now());
                identity.revocation_refreshed.set(now as i64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "refreshing the revocation list failed; keeping the last one")
            }
        }
        if let Err(e) = refresh_bundle(&identity, &issuer).await {
            tracing::warn!(error = %e, "refreshing the trust bundle failed; keeping the last one");
        }
        if !sleep_or_stop(every, &mut shutdown).await {
            return;
        }
    }
}

/// Fetches the CA's bundle; the roots configured locally stay trusted beside it (they may hold
/// roots the CA does not publish, such as a federated domain's).
///
/// A root the configured bundle does not hold is taken only from a CA whose region was checked
/// in the handshake ([`CaClient::expect_region`]: our own region's CA, authoritative for our
/// trust domain as a SPIFFE bundle endpoint is). Without that check any region's CA could be
/// answering, and one compromised CA key would add its own root everywhere.
async fn refresh_bundle(identity: &Identity, issuer: &impl Issuer) -> Result<(), Error> {
    let mut roots = issuer.bundle().await?;
    let current = identity.bundle();
    if !issuer.region_checked() {
        let before = roots.len();
        roots.retain(|r| identity.configured_roots.contains(r));
        if roots.len() < before {
            tracing::warn!(
                ignored = before - roots.len(),
                "the CA's bundle holds roots the configured bundle does not; they are not trusted \
                 (set the role's `region` to check the CA's region and take its bundle)"
            );
        }
    }
    if issuer.region_checked() {
        note_withdrawals(identity, &roots);
    }
    let fresh = identity.with_configured_roots(roots)?;
    if fresh.store().is_empty() {
        // Never left without a root of our own trust domain: that would refuse every peer.
        return Err(Error::NoOwnRoot);
    }
    identity.bundle_fetches.fetch_add(1, Ordering::Relaxed);
    if fresh.roots != current.roots {
        identity.trust.set_bundle(fresh).map_err(Error::SetBundle)?;
        identity.bundle_changed();
        tracing::info!("trust bundle updated from the CA");
    }
    Ok(())
}

/// Follows our own region's CA when it withdraws a root (the end of a root rotation): a
/// configured root it published at the last refresh and no longer does is no longer trusted;
/// one it publishes again is trusted again. A configured root it never published (another
/// trust domain's, a local extra) is left alone.
fn note_withdrawals(identity: &Identity, roots: &[CertificateDer<'static>]) {
    let mut last = identity
        .last_published
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut withdrawn = identity.withdrawn.lock().unwrap_or_else(|e| e.into_inner());
    for r in last.iter() {
        let gone = !roots.contains(r) && identity.configured_roots.contains(r);
        if gone && !withdrawn.contains(r) {
            tracing::warn!(
                "the CA withdrew a root of the configured bundle; it is no longer trusted"
            );
            withdrawn.push(r.clone());
        }
    }
    withdrawn.retain(|r| !roots.contains(r));
    *last = roots.to_vec();
}

/// Fetches `GET /v1/revoked` and parses the serials.
pub async fn fetch_revoked(client: &CaClient) -> Result<HashSet<Serial>, Error> {
    let mut conn = client.connect(None).await?;
    let (status, body) = conn.get("/v1/revoked", None).await?;
    if !status.is_success() {
        return Err(Error::RevokedStatus(status));
    }
    parse_revoked(&body)
}

/// Reads the serials of a `GET /v1/revoked` body (every entry, expired or not).
pub fn parse_revoked(body: &[u8]) -> Result<HashSet<Serial>, Error> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(Error::RevokedJson)?;
    let list = v["revoked"].as_array().ok_or(Error::NoRevokedList)?;
    list.iter()
        .map(|r| {
            r["serial"]
                .as_str()
                .and_then(Serial::parse_hex)
                .ok_or_else(|| Error::BadSerial(r.clone()))
        })
        .collect()
}
