//! The identity task: obtains this workload's SVID, validates it against the bundle, publishes it
//! for every new handshake, renews it before it expires, and keeps the revocation list fresh.
//!
//! Rotation is one task. Publishing swaps an `Arc` that the TLS resolvers read per handshake, so
//! existing connections keep the certificate they were opened with and are never dropped.
//! Renewal happens at 50 % ±10 % of the remaining lifetime; on failure the valid SVID keeps
//! serving while retries back off exponentially up to [`BACKOFF_CAP`]. When the SVID expires
//! without a successor, it is withdrawn: new handshakes fail and readiness goes false.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::Instrument;

use crate::clock::{rfc3339, Clock};
use crate::identity::{certs_from_pem, Bundle, Serial, SpiffeId, Svid};
use crate::region::Region;
use crate::tls::mesh::{RevokedSet, SvidResolver, Trust};
use ca_client::CaClient;

pub mod ca_client;
pub mod config;
mod workload_api;

/// Longest wait between renewal attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(150);
const BACKOFF_START: Duration = Duration::from_secs(1);

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
}

/// The shared, always-current identity of this sidecar.
pub struct Identity {
    /// Read by every TLS handshake.
    pub resolver: Arc<SvidResolver>,
    /// Serials to refuse.
    pub revoked: RevokedSet,
    current: ArcSwapOption<Svid>,
    rotations: watch::Sender<u64>,
    /// Bumped when the revocation list changes, so live connections are re-checked at once.
    revocations: watch::Sender<u64>,
    id: SpiffeId,
    trust: Arc<Trust>,
    /// The roots from the sidecar's own configuration, kept across bundle refreshes.
    configured_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    bundle_fetches: std::sync::atomic::AtomicU64,
    /// When the revocation list was last refreshed (Unix seconds; 0: never): a list that stops
    /// refreshing fails open for new revocations, so it is exported for alerting.
    revocation_refreshed: prometheus_client::metrics::gauge::Gauge,
    clock: Clock,
}

impl Identity {
    /// An identity with nothing published yet.
    pub fn new(id: SpiffeId, bundle: Bundle, clock: Clock) -> Result<Arc<Self>, String> {
        let configured_roots = bundle.roots.clone();
        let trust = Trust::new(bundle).map_err(|e| format!("trust bundle: {e}"))?;
        Ok(Arc::new(Identity {
            resolver: Arc::new(SvidResolver::default()),
            revoked: Arc::new(ArcSwap::from_pointee(HashSet::new())),
            current: ArcSwapOption::empty(),
            rotations: watch::channel(0).0,
            revocations: watch::channel(0).0,
            id,
            trust,
            configured_roots,
            bundle_fetches: Default::default(),
            revocation_refreshed: Default::default(),
            clock,
        }))
    }

    /// The SVID in use, if any.
    pub fn current(&self) -> Option<Arc<Svid>> {
        self.current.load_full()
    }

    /// The bundle in force (refreshed from the CA).
    pub fn bundle(&self) -> Arc<Bundle> {
        self.trust.bundle()
    }

    /// How many times the bundle was fetched from the CA (successfully).
    pub fn bundle_fetches(&self) -> u64 {
        self.bundle_fetches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Registers the identity's metrics (the revocation list's freshness).
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "trustline_revocation_list_refreshed_timestamp_seconds",
            "When the revocation list was last fetched from the CA (Unix time; 0 = never); alert on time() minus this",
            self.revocation_refreshed.clone(),
        );
    }

    /// The shared trust state the TLS verifiers read.
    pub fn trust(&self) -> Arc<Trust> {
        self.trust.clone()
    }

    /// What every peer certificate must also pass: our trust domain, not revoked.
    pub fn peer_checks(&self) -> crate::tls::mesh::PeerChecks {
        crate::tls::mesh::PeerChecks {
            trust_domain: self.id.trust_domain().clone(),
            revoked: self.revoked.clone(),
        }
    }

    /// The SPIFFE ID this sidecar runs as.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Ready when a valid SVID is held.
    pub fn ready(&self) -> Result<(), String> {
        match self.current() {
            None => Err("no SVID yet".into()),
            Some(s) if s.info.not_after <= self.clock.now() => Err("SVID expired".into()),
            Some(_) => Ok(()),
        }
    }

    /// How long until the held SVID expires, plus 1 ms so that a task waking then finds it
    /// expired; `None` without an SVID.
    pub fn until_expiry(&self) -> Option<Duration> {
        let cur = self.current()?;
        Some(
            cur.info
                .not_after
                .duration_since(self.clock.now())
                .unwrap_or_default()
                + Duration::from_millis(1),
        )
    }

    /// A receiver that changes on every rotation (the value counts them).
    pub fn rotations(&self) -> watch::Receiver<u64> {
        self.rotations.subscribe()
    }

    /// A receiver that changes whenever the revocation list changes.
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Replaces the revocation list; announces it when it changed.
    pub fn set_revoked(&self, set: HashSet<Serial>) {
        if **self.revoked.load() != set {
            self.revoked.store(Arc::new(set));
            self.revocations.send_modify(|n| *n += 1);
        }
    }

    /// Validates `svid` (chain to the bundle, our SPIFFE ID, key matches) and publishes it.
    pub fn publish(&self, svid: Svid) -> Result<(), String> {
        let info =
            crate::tls::verify_svid_chain(&self.trust.bundle(), &svid.chain, self.clock.now())
                .map_err(|e| e.to_string())?;
        if info.id != self.id {
            return Err(format!(
                "SVID is for {}, this sidecar is {}",
                info.id, self.id
            ));
        }
        let ck = CertifiedKey::from_der(
            svid.chain.clone(),
            svid.key.clone_key(),
            &crate::crypto::provider(),
        )
        .map_err(|e| format!("certificate and key: {e}"))?;
        self.resolver.0.store(Some(Arc::new(ck)));
        self.current.store(Some(Arc::new(svid)));
        self.rotations.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A bundle of our trust domain holding `roots` plus the locally configured ones.
    fn with_configured_roots(
        &self,
        mut roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> Result<Bundle, String> {
        for r in &self.configured_roots {
            if !roots.contains(r) {
                roots.push(r.clone());
            }
        }
        Bundle::new(self.trust.bundle().trust_domain.clone(), roots).map_err(|e| e.to_string())
    }

    fn withdraw(&self) {
        self.resolver.0.store(None);
        self.current.store(None);
        self.rotations.send_modify(|n| *n += 1);
    }
}

/// Starts the identity task for `config`; it ends when `shutdown` changes.
pub fn start(
    config: IdentityConfig,
    clock: Clock,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<Identity>, String> {
    let identity = Identity::new(config.id.clone(), config.bundle.clone(), clock.clone())?;
    let span = tracing::info_span!("identity", id = %config.id);
    match &config.source {
        IdentitySource::Ca {
            url,
            token_file,
            region,
        } => {
            let client = CaClient::new(url, config.bundle.clone(), clock).map(|c| match region {
                Some(r) => c.expect_region(r.clone()),
                None => c,
            });
            match client {
                Ok(client) => {
                    tokio::spawn(
                        ca_loop(
                            identity.clone(),
                            client.clone(),
                            token_file.clone(),
                            shutdown.clone(),
                        )
                        .instrument(span.clone()),
                    );
                    tokio::spawn(
                        refresh_loop(identity.clone(), client, config.refresh, shutdown)
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
                files_loop(identity.clone(), cert.clone(), key.clone(), *poll, shutdown)
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

/// When to renew an SVID received at `now`: 50 % ±10 % of what is left of its lifetime.
pub fn renewal_delay(now: SystemTime, not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or_default();
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    let jitter = (u16::from_le_bytes(b) as f64 / u16::MAX as f64) * 0.2 - 0.1; // -0.1..=0.1
    left.mul_f64(0.5 + jitter)
}

async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.changed() => false,
    }
}

async fn ca_loop(
    identity: Arc<Identity>,
    client: CaClient,
    token_file: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let attempt = match identity.current() {
            None => first_svid(&identity, &client, &token_file).await,
            Some(cur) => client.renew(&cur).await.map_err(|e| e.to_string()),
        };
        let wait = match attempt.and_then(|svid| {
            let not_after = svid.info.not_after;
            let serial = svid.info.serial.clone();
            identity.publish(svid).map(|()| (not_after, serial))
        }) {
            Ok((not_after, serial)) => {
                backoff = BACKOFF_START;
                tracing::info!(%serial, not_after = %rfc3339(not_after), "SVID published");
                renewal_delay(identity.clock.now(), not_after)
            }
            Err(e) => {
                let wait = backoff;
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

fn expire_if_due(identity: &Identity) {
    if let Some(cur) = identity.current() {
        if cur.info.not_after <= identity.clock.now() {
            tracing::error!(serial = %cur.info.serial, "SVID expired without renewal; refusing traffic until a new one arrives");
            identity.withdraw();
        }
    }
}

async fn first_svid(
    identity: &Identity,
    client: &CaClient,
    token_file: &PathBuf,
) -> Result<Svid, String> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("join token file {}: {e}", token_file.display()))?;
    client
        .issue_with_token(&identity.id, token.trim())
        .await
        .map_err(|e| e.to_string())
}

/// Refreshes the revocation list and the trust bundle from the CA every `every`.
async fn refresh_loop(
    identity: Arc<Identity>,
    client: CaClient,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match fetch_revoked(&client).await {
            Ok(set) => {
                identity.set_revoked(set);
                let now = crate::clock::unix_secs(identity.clock.now());
                identity.revocation_refreshed.set(now as i64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "refreshing the revocation list failed; keeping the last one")
            }
        }
        if let Err(e) = refresh_bundle(&identity, &client).await {
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
async fn refresh_bundle(identity: &Identity, client: &CaClient) -> Result<(), String> {
    let pem = client.fetch_bundle_pem().await.map_err(|e| e.to_string())?;
    let current = identity.bundle();
    let mut roots =
        crate::identity::certs_from_pem(&pem, "CA bundle").map_err(|e| e.to_string())?;
    let region_checked = matches!(client.region(), crate::svid::ca_client::CaRegion::Is(_));
    if !region_checked {
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
    let fresh = identity.with_configured_roots(roots)?;
    identity
        .bundle_fetches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if fresh.roots != current.roots {
        identity
            .trust
            .set_bundle(fresh)
            .map_err(|e| e.to_string())?;
        tracing::info!("trust bundle updated from the CA");
    }
    Ok(())
}

/// Fetches `GET /v1/revoked` and parses the serials.
pub async fn fetch_revoked(client: &CaClient) -> Result<HashSet<Serial>, String> {
    let mut conn = client.connect(None).await.map_err(|e| e.to_string())?;
    let (status, body) = conn
        .get("/v1/revoked", None)
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("CA answered {status}"));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let list = v["revoked"].as_array().ok_or("no revoked list in answer")?;
    list.iter()
        .map(|r| {
            r["serial"]
                .as_str()
                .and_then(Serial::parse_hex)
                .ok_or_else(|| format!("bad serial in revocation list: {r}"))
        })
        .collect()
}

/// Loads an SVID from PEM files (chain, leaf first; PKCS#8/SEC1 key).
pub fn load_svid_files(cert: &PathBuf, key: &PathBuf) -> Result<Svid, String> {
    let chain_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let chain =
        certs_from_pem(&chain_pem, &cert.display().to_string()).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let info =
        crate::identity::inspect_cert(&chain[0]).map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Svid { chain, key, info })
}

fn stamp(paths: [&PathBuf; 2]) -> Option<Vec<(SystemTime, u64)>> {
    paths.iter().map(|p| crate::util::file_stamp(p)).collect()
}

async fn files_loop(
    identity: Arc<Identity>,
    cert: PathBuf,
    key: PathBuf,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen = None;
    loop {
        let now = stamp([&cert, &key]);
        if now.is_some() && now != seen {
            match load_svid_files(&cert, &key).and_then(|s| identity.publish(s)) {
                Ok(()) => {
                    seen = now;
                    tracing::info!(cert = %cert.display(), "SVID loaded from files");
                }
                // A half-written pair is retried on the next poll.
                Err(e) => {
                    tracing::warn!(error = %e, "SVID files not usable; keeping the current SVID")
                }
            }
        }
        expire_if_due(&identity);
        if !sleep_or_stop(poll, &mut shutdown).await {
            return;
        }
    }
}
