//! SPIFFE Federation, the consumer side: the bundles of other trust domains, fetched from their
//! bundle endpoints and kept fresh, fed to the TLS verifiers ([`crate::tls::mesh::Trust`]) as
//! roots for those trust domains' identities only.
//!
//! One task per `[[federation]]` table ([`config`]): fetch ([`fetch`]: `https_spiffe` verifies
//! the server against the trust domain's *current* bundle, starting from the configured initial
//! one; `https_web` by WebPKI against the configured roots), read ([`doc`]), check (roots all CA
//! certificates, at least one; `spiffe_sequence` never lower than the one held), publish, then
//! sleep for the document's `spiffe_refresh_hint` clamped to [`MIN_REFRESH`]..=[`MAX_REFRESH`]
//! (or the table's `refresh`). A failed fetch keeps the last good bundle and retries sooner.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::Instrument;

pub mod config;
pub mod doc;
pub mod fetch;

pub use config::{federation_config, Endpoint, FederatedDomain, FederationFile, Profile};

use crate::clock::Clock;
use crate::identity::{Bundle, IdentityError, TrustDomain};
use crate::jwt::JwtBundle;
use crate::tls::mesh::{FederationTrustError, Trust};

/// Shortest wait between two fetches the document's hint may ask for.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Longest wait between two fetches, whatever the hint.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Wait when the document gives no hint.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Wait after a failed fetch (or the `refresh` override, when shorter).
pub const RETRY: Duration = Duration::from_secs(30);

/// Why a federated bundle could not be set up or refreshed.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("bundle document of {trust_domain}: {reason}")]
    Document {
        trust_domain: TrustDomain,
        reason: String,
    },
    #[error("bundle of {trust_domain}: spiffe_sequence {got} is lower than the {held} held; refused (a replayed or rolled-back document)")]
    SequenceWentBack {
        trust_domain: TrustDomain,
        got: u64,
        held: u64,
    },
    #[error("bundle of {trust_domain}: {source}")]
    Bundle {
        trust_domain: TrustDomain,
        source: IdentityError,
    },
    #[error("bundle of {trust_domain} names no root of {trust_domain} (its roots' SPIFFE IDs name other trust domains)")]
    NoOwnRoots { trust_domain: TrustDomain },
    #[error(transparent)]
    Trust(#[from] FederationTrustError),
    #[error("fetching {trust_domain}'s bundle from {url}: {source}")]
    Fetch {
        trust_domain: TrustDomain,
        url: String,
        source: FetchError,
    },
    #[error("{0} is not a federated trust domain")]
    Unknown(TrustDomain),
}

/// Why one fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake (server not authenticated): {0}")]
    Handshake(String),
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
    #[error("none of the web_roots is a usable certificate ({unusable} unusable)")]
    NoWebRoots { unusable: usize },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("reading the body (at most 1 MiB): {0}")]
    Body(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A federated trust domain's bundle as held now.
#[derive(Clone, Debug)]
pub struct FederatedBundle {
    pub trust_domain: TrustDomain,
    /// The X.509 roots (the initial bundle until the first good fetch).
    pub roots: Vec<CertificateDer<'static>>,
    /// The `jwt-svid` keys of the last good document (none before the first).
    pub jwt: JwtBundle,
    /// The last good document's `spiffe_sequence`.
    pub sequence: Option<u64>,
    /// Good fetches so far.
    pub fetches: u64,
    /// The last fetch's error, if it failed.
    pub last_error: Option<String>,
}

struct DomainState {
    config: FederatedDomain,
    held: Mutex<FederatedBundle>,
}

/// The federated trust domains of one process, their bundles and the tasks refreshing them.
pub struct Federation {
    domains: Vec<DomainState>,
    trust: Option<Arc<Trust>>,
    changes: watch::Sender<u64>,
    clock: Clock,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("domains", &self.trust_domains())
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// The federation of `domains`, feeding `trust` (when given) with each trust domain's
    /// roots, starting with the initial bundles at once. No fetch yet: [`Federation::spawn`].
    pub fn new(
        domains: Vec<FederatedDomain>,
        trust: Option<Arc<Trust>>,
        clock: Clock,
    ) -> Result<Arc<Self>, FederationError> {
        let mut states = Vec::with_capacity(domains.len());
        for d in domains {
            let td = d.trust_domain.clone();
            if let Some(t) = &trust {
                t.set_federated(bundle_of(&td, d.bootstrap.clone())?)?;
            }
            states.push(DomainState {
                held: Mutex::new(FederatedBundle {
                    trust_domain: td.clone(),
                    roots: d.bootstrap.clone(),
                    jwt: JwtBundle::new(td.clone()),
                    sequence: None,
                    fetches: 0,
                    last_error: None,
                }),
                config: d,
            });
        }
        Ok(Arc::new(Federation {
            domains: states,
            trust,
            changes: watch::channel(0).0,
            clock,
        }))
    }

    /// The federated trust domains.
    pub fn trust_domains(&self) -> Vec<TrustDomain> {
        self.domains
            .iter()
            .map(|d| d.config.trust_domain.clone())
            .collect()
    }

    /// Every federated trust domain's X.509 roots and JWT keys as held now (what the agent's
    /// `FetchX509Bundles` and `FetchJWTBundles` serve beside our own).
    pub fn bundles(&self) -> Vec<(TrustDomain, Vec<CertificateDer<'static>>, JwtBundle)> {
        self.domains
            .iter()
            .map(|d| {
                let held = lock(&d.held);
                (
                    held.trust_domain.clone(),
                    held.roots.clone(),
                    held.jwt.clone(),
                )
            })
            .collect()
    }

    /// Every federated trust domain's state (roots, keys, sequence, fetches, last error).
    pub fn status(&self) -> Vec<FederatedBundle> {
        self.domains.iter().map(|d| lock(&d.held).clone()).collect()
    }

    /// Trust domain `td`'s bundle as held now.
    pub fn bundle(&self, td: &TrustDomain) -> Option<FederatedBundle> {
        self.domain(td).ok().map(|d| lock(&d.held).clone())
    }

    /// Each federated trust domain's state for the admin listener's `/federation`: endpoint,
    /// profile, roots and keys held, sequence, good fetches and the last error.
    pub fn status_json(&self) -> serde_json::Value {
        let domains: Vec<serde_json::Value> = self
            .domains
            .iter()
            .map(|d| {
                let held = lock(&d.held);
                serde_json::json!({
                    "trust_domain": held.trust_domain.to_string(),
                    "bundle_endpoint": d.config.endpoint.url,
                    "profile": d.config.profile.name(),
                    "roots": held.roots.len(),
                    "jwt_keys": held.jwt.len(),
                    "sequence": held.sequence,
                    "fetches": held.fetches,
                    "last_error": held.last_error,
                })
            })
            .collect();
        serde_json::json!({ "federation": domains })
    }

    /// Changes whenever a federated bundle changes (the value counts the changes).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn domain(&self, td: &TrustDomain) -> Result<&DomainState, FederationError> {
        self.domains
            .iter()
            .find(|d| &d.config.trust_domain == td)
            .ok_or_else(|| FederationError::Unknown(td.clone()))
    }

    /// Starts one refresh task per federated trust domain; they end when `stop` changes.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        for d in &self.domains {
            let td = d.config.trust_domain.clone();
            let me = self.clone();
            let span = tracing::info_span!("federation", trust_domain = %td);
            tokio::spawn(me.run(td, stop.clone()).instrument(span));
        }
    }

    async fn run(self: Arc<Self>, td: TrustDomain, mut stop: watch::Receiver<bool>) {
        loop {
            let wait = match self.refresh(&td).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "federated bundle not refreshed; keeping the last good one");
                    self.domain(&td)
                        .ok()
                        .and_then(|d| d.config.refresh)
                        .map_or(RETRY, |r| r.min(RETRY))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Fetches, checks and publishes `td`'s bundle once; gives the wait until the next fetch.
    /// On failure the bundle held stays as it was (and the error is remembered).
    pub async fn refresh(&self, td: &TrustDomain) -> Result<Duration, FederationError> {
        let d = self.domain(td)?;
        let result = self.fetch_and_apply(d).await;
        let mut held = lock(&d.held);
        match &result {
            Ok(_) => held.last_error = None,
            Err(e) => held.last_error = Some(e.to_string()),
        }
        result
    }

    async fn fetch_and_apply(&self, d: &DomainState) -> Result<Duration, FederationError> {
        let td = &d.config.trust_domain;
        let current = bundle_of(td, lock(&d.held).roots.clone())?;
        let fetch_err = |source| FederationError::Fetch {
            trust_domain: td.clone(),
            url: d.config.endpoint.url.clone(),
            source,
        };
        let tls = fetch::tls_config(&d.config.profile, &current, &self.clock).map_err(fetch_err)?;
        let body = fetch::get(&d.config.endpoint, tls)
            .await
            .map_err(fetch_err)?;
        let doc = doc::parse(td, &body)?;
        let fresh = bundle_of(td, doc.x509_roots.clone())?;
        if fresh.store().is_empty() {
            return Err(FederationError::NoOwnRoots {
                trust_domain: td.clone(),
            });
        }
        let changed = {
            let mut held = lock(&d.held);
            if let (Some(got), Some(have)) = (doc.sequence, held.sequence) {
                if got < have {
                    return Err(FederationError::SequenceWentBack {
                        trust_domain: td.clone(),
                        got,
                        held: have,
                    });
                }
            }
            let changed = held.roots != doc.x509_roots || held.jwt.to_jwks() != doc.jwt.to_jwks();
            if held.roots != doc.x509_roots {
                if let Some(t) = &self.trust {
                    t.set_federated(fresh)?;
                }
            }
            held.roots = doc.x509_roots;
            held.jwt = doc.jwt;
            held.sequence = doc.sequence.or(held.sequence);
            held.fetches += 1;
            changed
        };
        if changed {
            tracing::info!(roots = lock(&d.held).roots.len(), sequence = ?doc.sequence, "federated bundle updated");
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(next_refresh(d.config.refresh, doc.refresh_hint))
    }
}

/// The wait before the next fetch: the override if configured, else the document's hint
/// clamped to [`MIN_REFRESH`]..=[`MAX_REFRESH`] ([`DEFAULT_REFRESH`] without one).
pub fn next_refresh(override_: Option<Duration>, hint: Option<Duration>) -> Duration {
    override_.unwrap_or_else(|| {
        hint.unwrap_or(DEFAULT_REFRESH)
            .clamp(MIN_REFRESH, MAX_REFRESH)
    })
}

fn bundle_of(
    td: &TrustDomain,
    roots: Vec<CertificateDer<'static>>,
) -> Result<Bundle, FederationError> {
    Bundle::new(td.clone(), roots).map_err(|source| FederationError::Bundle {
        trust_domain: td.clone(),
        source,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
