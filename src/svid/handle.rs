//! The identity handle every role holds: the SVID in use (read by the TLS resolvers on each
//! handshake), the trust state, the revocation list, readiness; and the two rules of time that
//! every source shares: when to renew ([`renewal_delay`]) and when an SVID is withdrawn
//! ([`expire_if_due`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::Error;
use crate::admin::NotReady;
use crate::clock::Clock;
use crate::identity::{Bundle, Serial, SpiffeId, Svid};
use crate::tls::mesh::{RevokedSet, SvidResolver, Trust};

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
    /// Bumped when the trust bundle in force changes (a refresh from the CA).
    bundle_updates: watch::Sender<u64>,
    id: SpiffeId,
    pub(super) trust: Arc<Trust>,
    /// The roots from the sidecar's own configuration, kept across bundle refreshes unless
    /// our own region's CA withdrew them ([`Identity::withdrawn`]).
    pub(super) configured_roots: Vec<CertificateDer<'static>>,
    /// The roots our own region's CA published at the last refresh.
    pub(super) last_published: std::sync::Mutex<Vec<CertificateDer<'static>>>,
    /// Configured roots our own region's CA published and then withdrew (a root rotation's
    /// last step): no longer trusted, until it publishes them again.
    pub(super) withdrawn: std::sync::Mutex<Vec<CertificateDer<'static>>>,
    pub(super) bundle_fetches: AtomicU64,
    /// When the revocation list was last refreshed (Unix seconds; 0: never): a list that stops
    /// refreshing fails open for new revocations, so it is exported for alerting.
    pub(super) revocation_refreshed: prometheus_client::metrics::gauge::Gauge,
    pub(super) clock: Clock,
    /// The JWT bundles that verify the tokens the policy reads ([`super::jwt_bundle`]).
    pub(super) jwt: super::jwt_bundle::JwtBundleState,
}

impl Identity {
    /// An identity with nothing published yet.
    pub fn new(id: SpiffeId, bundle: Bundle, clock: Clock) -> Result<Arc<Self>, Error> {
        let configured_roots = bundle.roots.clone();
        let trust = Trust::new(bundle).map_err(Error::TrustBundle)?;
        Ok(Arc::new(Identity {
            resolver: Arc::new(SvidResolver::default()),
            revoked: Arc::new(ArcSwap::from_pointee(HashSet::new())),
            current: ArcSwapOption::empty(),
            rotations: watch::channel(0).0,
            revocations: watch::channel(0).0,
            bundle_updates: watch::channel(0).0,
            id,
            trust,
            configured_roots,
            last_published: Default::default(),
            withdrawn: Default::default(),
            bundle_fetches: Default::default(),
            revocation_refreshed: Default::default(),
            clock,
            jwt: Default::default(),
        }))
    }

    /// An identity for `id` with nothing published yet that shares `other`'s trust state
    /// (bundle, revocation list) and clock: a host agent's workloads, whose SVIDs chain to the
    /// bundle the agent's own identity task keeps fresh.
    pub fn sharing(id: SpiffeId, other: &Identity) -> Arc<Self> {
        Arc::new(Identity {
            resolver: Arc::new(SvidResolver::default()),
            revoked: other.revoked.clone(),
            current: ArcSwapOption::empty(),
            rotations: watch::channel(0).0,
            revocations: watch::channel(0).0,
            bundle_updates: watch::channel(0).0,
            id,
            trust: other.trust.clone(),
            configured_roots: other.configured_roots.clone(),
            last_published: Default::default(),
            withdrawn: Default::default(),
            bundle_fetches: Default::default(),
            revocation_refreshed: Default::default(),
            clock: other.clock.clone(),
            jwt: Default::default(),
        })
    }

    /// The SVID in use, if any.
    pub fn current(&self) -> Option<Arc<Svid>> {
        self.current.load_full()
    }

    /// The clock this identity's expiry is judged by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The bundle in force (refreshed from the CA).
    pub fn bundle(&self) -> Arc<Bundle> {
        self.trust.bundle()
    }

    /// How many times the bundle was fetched from the CA (successfully).
    pub fn bundle_fetches(&self) -> u64 {
        self.bundle_fetches.load(Ordering::Relaxed)
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

    /// Ready when a valid SVID is held; otherwise the reason, as `/readyz` and the refusals
    /// show it.
    pub fn ready(&self) -> Result<(), NotReady> {
        match self.current() {
            None => Err(NotReady::NoSvid),
            Some(s) if s.info.not_after <= self.clock.now() => Err(NotReady::SvidExpired),
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

    /// A receiver that changes whenever the trust bundle in force changes.
    pub fn bundle_updates(&self) -> watch::Receiver<u64> {
        self.bundle_updates.subscribe()
    }

    /// Announces a change of the trust bundle in force.
    pub(super) fn bundle_changed(&self) {
        self.bundle_updates.send_modify(|n| *n += 1);
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
    pub fn publish(&self, svid: Svid) -> Result<(), Error> {
        let info =
            crate::tls::verify_svid_chain(&self.trust.bundle(), &svid.chain, self.clock.now())
                .map_err(Error::Unverified)?;
        if info.id != self.id {
            return Err(Error::NotOurs {
                got: info.id,
                ours: self.id.clone(),
            });
        }
        let ck = CertifiedKey::from_der(
            svid.chain.clone(),
            svid.key.clone_key(),
            &crate::crypto::provider(),
        )
        .map_err(Error::KeyPair)?;
        self.resolver.0.store(Some(Arc::new(ck)));
        self.current.store(Some(Arc::new(svid)));
        self.rotations.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A bundle of our trust domain holding `roots` plus the locally configured ones (but
    /// those our CA withdrew).
    pub(super) fn with_configured_roots(
        &self,
        mut roots: Vec<CertificateDer<'static>>,
    ) -> Result<Bundle, Error> {
        let withdrawn = self.withdrawn.lock().unwrap_or_else(|e| e.into_inner());
        for r in &self.configured_roots {
            if !roots.contains(r) && !withdrawn.contains(r) {
                roots.push(r.clone());
            }
        }
        Bundle::new(self.trust.bundle().trust_domain.clone(), roots).map_err(Error::Bundle)
    }

    fn withdraw(&self) {
        self.resolver.0.store(None);
        self.current.store(None);
        self.rotations.send_modify(|n| *n += 1);
    }
}

/// Withdraws the held SVID once its `not_after` has passed: new handshakes fail and readiness
/// goes false until a successor is published.
pub(super) fn expire_if_due(identity: &Identity) {
    if let Some(cur) = identity.current() {
        if cur.info.not_after <= identity.clock.now() {
            tracing::error!(serial = %cur.info.serial, "SVID expired without renewal; refusing traffic until a new one arrives");
            identity.withdraw();
        }
    }
}

/// Where in the ±10 % window around half-life a renewal lands. Random in production, so a fleet
/// issued at once does not renew at once; fixed in tests, so their timing is exact.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Jitter {
    /// Drawn from the system's random generator for each renewal.
    #[default]
    Random,
    /// Always this point of the window: 0.0 renews at 40 % of the remaining lifetime, 0.5 at
    /// 50 %, 1.0 at 60 % (clamped to 0.0..=1.0).
    At(f64),
}

impl Jitter {
    /// The fraction of the remaining lifetime to wait: 0.4..=0.6.
    fn fraction(self) -> f64 {
        let at = match self {
            Jitter::Random => {
                let mut b = [0u8; 2];
                let _ = aws_lc_rs::rand::fill(&mut b);
                u16::from_le_bytes(b) as f64 / u16::MAX as f64
            }
            Jitter::At(at) => at.clamp(0.0, 1.0),
        };
        0.5 + at * 0.2 - 0.1
    }
}

/// When to renew an SVID received at `now`: 50 % ±10 % of what is left of its lifetime.
pub fn renewal_delay(now: SystemTime, not_after: SystemTime) -> Duration {
    renewal_delay_with(Jitter::Random, now, not_after)
}

/// [`renewal_delay`] with the point in the ±10 % window chosen by `jitter`.
pub fn renewal_delay_with(jitter: Jitter, now: SystemTime, not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or_default();
    left.mul_f64(jitter.fraction())
}
