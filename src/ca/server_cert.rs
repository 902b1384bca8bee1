//! The CA server's own HTTPS certificate and the TLS configuration that serves it. The
//! certificate is issued by the CA itself with a fresh in-memory key each time, serverAuth only
//! (so it can never be used as a client SVID), and renewed at half its life.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::api::CaState;
use super::authority::{Authority, LeafUsage};
use super::error::{ServeError, ServerCertError};
use super::rotation::CaKeys;
use crate::clock::{rfc3339, unix_secs, Clock};
use crate::crypto::{provider, TLS13_ONLY};
use crate::identity::SpiffeId;

/// Longest life of the server certificate, whatever the SVID TTL.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the renewal task looks at the wall clock.
const CHECK: Duration = Duration::from_secs(1);
/// Wait before trying again after a failed renewal.
const RETRY: Duration = Duration::from_secs(10);

/// Serves the newest server certificate to every handshake, and knows how to make the next.
#[derive(Debug)]
pub(super) struct ServerCert {
    current: ArcSwap<CertifiedKey>,
    /// `spiffe://TD/trustline/ca`.
    id: SpiffeId,
    /// DNS names and IPs of the certificate.
    names: Vec<String>,
    ttl: Duration,
    /// When the first certificate is due for renewal (half its life).
    first_due: SystemTime,
}

/// One issued server certificate.
struct Leaf {
    key: CertifiedKey,
    not_after: SystemTime,
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ServerCert {
    /// Issues the first certificate for `localhost`, `127.0.0.1` and `san`; gives its not_after.
    pub(super) fn first(
        authority: &Authority,
        san: &[String],
        clock: &Clock,
        svid_ttl: Duration,
    ) -> Result<(Arc<Self>, SystemTime), ServeError> {
        let id = crate::identity::ids::ca_id(&authority.trust_domain);
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        names.extend(san.iter().cloned());
        let ttl = svid_ttl.min(MAX_TTL);
        let leaf = issue(authority, &id, &names, clock, ttl)?;
        let me = ServerCert {
            current: ArcSwap::from_pointee(leaf.key),
            id,
            names,
            ttl,
            first_due: clock.now() + ttl / 2,
        };
        Ok((Arc::new(me), leaf.not_after))
    }

    /// Renews the certificate at half its life, and at once when a new intermediate is
    /// activated (so the server's chain is the active intermediate's), until `shutdown`.
    pub(super) async fn renew(
        self: Arc<Self>,
        state: Arc<CaState>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Due by the wall clock, checked every CHECK: a clock that jumps (a suspended VM, an
        // NTP step) does not leave the server with an expired certificate until a timer fires.
        let mut due = self.first_due;
        let mut activations = state.authority.activations();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CHECK) => {
                    if state.clock.now() < due {
                        continue;
                    }
                }
                r = activations.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            let authority = state.authority.active();
            state
                .metrics
                .set_expiry("issuing", unix_secs(authority.not_after));
            match issue(&authority, &self.id, &self.names, &state.clock, self.ttl) {
                Ok(leaf) => {
                    self.current.store(Arc::new(leaf.key));
                    state
                        .metrics
                        .set_expiry("server", unix_secs(leaf.not_after));
                    tracing::info!(not_after = %rfc3339(leaf.not_after), "renewed the CA server certificate");
                    due = state.clock.now() + self.ttl / 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, "renewing the CA server certificate failed; retrying");
                    due = state.clock.now() + RETRY;
                }
            }
        }
    }
}

fn issue(
    authority: &Authority,
    id: &SpiffeId,
    names: &[String],
    clock: &Clock,
    ttl: Duration,
) -> Result<Leaf, ServerCertError> {
    let key = KeyPair::generate().map_err(ServerCertError::Key)?;
    let issued = authority.sign_leaf(id, &key, ttl, clock.now(), LeafUsage::Server { names })?;
    let chain = authority.chain_for(&issued.leaf);
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(Leaf {
        key: CertifiedKey::from_der(chain, key_der, &provider())?,
        not_after: issued.not_after,
    })
}

/// The API's TLS 1.3 configuration, serving `resolver`'s certificate.
pub(super) fn server_tls(
    keys: &CaKeys,
    resolver: Arc<ServerCert>,
    clock: &Clock,
) -> Result<rustls::ServerConfig, ServeError> {
    // Renewal is only for SVIDs this CA issued, so the client-auth anchors are the CA's own
    // intermediates (the active one, and the previous one until its last SVID expired), not
    // the whole root bundle ([`CaKeys::client_verifier`]).
    let verifier = keys.client_verifier();
    let mut cfg = rustls::ServerConfig::builder_with_details(provider(), Arc::new(clock.clone()))
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
