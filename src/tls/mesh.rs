//! The mesh's mTLS 1.3 configurations: SPIFFE checks on both ends, the newest SVID on every
//! handshake, revocations honoured, and a short reason for every refusal.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustc_hash::FxHashMap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

pub use super::Presenter;
use super::{tls13_signature, verify_schemes, ExpectedPeer, REFUSE_TLS12};
use crate::clock::Clock;
use crate::crypto::{provider, TLS13_ONLY};
use crate::identity::{inspect_cert, Bundle, Serial, TrustDomain};
use crate::refusal::Refusal;

/// ALPN protocol marking mesh traffic between sidecars.
pub const MESH_ALPN: &[u8] = b"trustline/1";

/// Revoked serials, replaced whole on each refresh.
pub type RevokedSet = Arc<ArcSwap<HashSet<Serial>>>;

/// Why a peer certificate was refused by a SPIFFE check (carried inside rustls errors).
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct SpiffeRejection {
    /// The reason for metrics: `bad_spiffe_id`, `wrong_trust_domain`, `leaf_is_ca`,
    /// `unexpected_identity`, ...
    pub reason: Refusal,
    /// What exactly was wrong.
    pub detail: String,
}

/// The error for a server whose SPIFFE ID is not the one expected for the destination.
pub fn unexpected_identity(detail: String) -> rustls::Error {
    reject(Refusal::UnexpectedIdentity, detail)
}

/// The trust bundles in force, replaceable while connections run (bundle refresh, federation).
/// Verifiers read them on every handshake.
///
/// Roots are kept per trust domain: our own bundle, and one per federated trust domain (SPIFFE
/// Federation). A peer's chain is verified against the roots of the trust domain of its leaf's
/// SPIFFE ID only ([`Trust::roots_for`]), so a federated trust domain's root never vouches for
/// an ID of ours or of a third trust domain.
pub struct Trust {
    bundle: ArcSwap<Bundle>,
    /// The federated trust domains (never ours), each with the roots last fetched for it.
    federated: ArcSwap<FxHashMap<TrustDomain, Arc<Bundle>>>,
    /// Bumped by every bundle change: chains verified against an older bundle are checked again.
    generation: AtomicU64,
    verified: Mutex<FxHashMap<ChainKey, Window>>,
}

/// Most chains remembered as verified (a sidecar sees a few peers, each with one SVID at a
/// time); when full, the memory starts over.
const VERIFIED_CHAINS: usize = 512;

/// When a remembered chain holds: verified against bundle `generation`, and every certificate
/// of it valid from `not_before` to `not_after` (Unix seconds).
#[derive(Clone, Copy)]
struct Window {
    generation: u64,
    not_before: u64,
    not_after: u64,
}

/// The cache key of a presented chain: SHA-256 over the presenter, then each certificate's
/// length and bytes. A digest, not the bytes, so that an entry costs 32 bytes however long the
/// chain a peer sent (up to 64 KiB in one handshake message).
fn chain_key(
    by: Presenter,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> ChainKey {
    let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    d.update(&[by as u8]);
    for c in std::iter::once(end_entity).chain(intermediates) {
        d.update(&(c.len() as u32).to_be_bytes());
        d.update(c);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(d.finish().as_ref());
    key
}

type ChainKey = [u8; 32];

/// The time every certificate of the chain is valid, `None` if one does not parse.
fn chain_window(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    generation: u64,
) -> Option<Window> {
    let mut w = Window {
        generation,
        not_before: 0,
        not_after: u64::MAX,
    };
    for c in std::iter::once(end_entity).chain(intermediates) {
        let (_, cert) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
        let v = cert.validity();
        w.not_before = w
            .not_before
            .max(u64::try_from(v.not_before.timestamp()).ok()?);
        w.not_after = w
            .not_after
            .min(u64::try_from(v.not_after.timestamp()).ok()?);
    }
    Some(w)
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("roots", &self.bundle.load().roots.len())
            .field("federated", &self.federated.load().len())
            .finish()
    }
}

impl Trust {
    /// Trust in `bundle`.
    pub fn new(bundle: Bundle) -> Result<Arc<Self>, rustls::Error> {
        Ok(Arc::new(Trust {
            bundle: ArcSwap::from_pointee(bundle),
            federated: ArcSwap::from_pointee(FxHashMap::default()),
            generation: AtomicU64::new(0),
            verified: Mutex::new(FxHashMap::default()),
        }))
    }

    /// The bundle in force.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.load_full()
    }

    /// Replaces the bundle; new handshakes use it at once.
    pub fn set_bundle(&self, bundle: Bundle) -> Result<(), rustls::Error> {
        self.bundle.store(Arc::new(bundle));
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lock_verified().clear();
        Ok(())
    }

    /// Trusts `bundle`'s roots for the identities of its trust domain, a federated one (it
    /// replaces the roots held for that trust domain). Our own trust domain is refused: its
    /// roots come from our own CA only.
    pub fn set_federated(&self, bundle: Bundle) -> Result<(), FederationTrustError> {
        let td = bundle.trust_domain.clone();
        if td == self.bundle.load().trust_domain {
            return Err(FederationTrustError::OwnTrustDomain(td));
        }
        let mut map = (**self.federated.load()).clone();
        map.insert(td, Arc::new(bundle));
        self.federated.store(Arc::new(map));
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lock_verified().clear();
        Ok(())
    }

    /// Whether `td` is a federated trust domain (whose IDs peers may hold).
    pub fn is_federated(&self, td: &TrustDomain) -> bool {
        self.federated.load().contains_key(td)
    }

    /// The bundle held for federated trust domain `td`.
    pub fn federated_bundle(&self, td: &TrustDomain) -> Option<Arc<Bundle>> {
        self.federated.load().get(td).cloned()
    }

    /// The federated trust domains.
    pub fn federated_domains(&self) -> Vec<TrustDomain> {
        let mut tds: Vec<_> = self.federated.load().keys().cloned().collect();
        tds.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        tds
    }

    /// The roots that may vouch for `leaf`: those of the federated trust domain its SPIFFE ID
    /// names, if it names one; our own otherwise (an ID of ours, of an unknown trust domain, or
    /// a leaf whose ID does not parse: the SPIFFE checks after the path refuse the last two).
    pub fn roots_for(&self, leaf: &CertificateDer<'_>) -> Arc<rustls::RootCertStore> {
        let federated = self.federated.load();
        if !federated.is_empty() {
            if let Ok(info) = inspect_cert(leaf) {
                if let Some(b) = federated.get(info.id.trust_domain()) {
                    return b.store();
                }
            }
        }
        self.bundle.load().store()
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, FxHashMap<ChainKey, Window>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `verify_path` (the signature and path checks of the chain against the bundle) unless
    /// this exact chain already passed it against the bundle in force and all its certificates
    /// are valid at `now`. Every connection between two sidecars presents the same chain until
    /// an SVID rotates, so this turns two signature verifications per handshake and side into a
    /// lookup. Failures are not remembered; the SPIFFE checks that follow still run every time.
    pub fn verify_path_cached(
        &self,
        by: Presenter,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify_path: impl FnOnce() -> Result<(), rustls::Error>,
    ) -> Result<(), rustls::Error> {
        // Read before verifying: a bundle change meanwhile makes this entry stale at once.
        let generation = self.generation.load(Ordering::SeqCst);
        let key = chain_key(by, end_entity, intermediates);
        let secs = now.as_secs();
        if let Some(w) = self.lock_verified().get(&key) {
            if w.generation == generation && (w.not_before..=w.not_after).contains(&secs) {
                return Ok(());
            }
        }
        verify_path()?;
        if let Some(w) = chain_window(end_entity, intermediates, generation) {
            let mut verified = self.lock_verified();
            if verified.len() >= VERIFIED_CHAINS {
                verified.clear();
            }
            verified.insert(key, w);
        }
        Ok(())
    }
}

/// A certificate refused by a SPIFFE check for `reason`, as rustls carries it (see
/// [`tls_reason`]).
pub(crate) fn reject(reason: Refusal, detail: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        SpiffeRejection { reason, detail },
    ))))
}

/// The reason of a failed handshake, for metrics and logs.
pub fn failure_reason(e: &std::io::Error) -> Refusal {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Refusal::EofDuringHandshake,
            std::io::ErrorKind::TimedOut => Refusal::Timeout,
            _ => Refusal::Io,
        };
    };
    tls_reason(tls)
}

/// The reason of a rustls error.
pub fn tls_reason(e: &rustls::Error) -> Refusal {
    use rustls::Error as E;
    match e {
        E::NoCertificatesPresented => Refusal::NoClientCertificate,
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => Refusal::UnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Refusal::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Refusal::NotYetValid
            }
            CertificateError::Revoked => Refusal::Revoked,
            CertificateError::BadSignature => Refusal::BadSignature,
            CertificateError::Other(o) => {
                o.0.downcast_ref::<SpiffeRejection>()
                    .map_or(Refusal::BadCertificate, |r| r.reason)
            }
            _ => Refusal::BadCertificate,
        },
        E::PeerIncompatible(_) => Refusal::IncompatiblePeer,
        E::AlertReceived(_) => Refusal::AlertReceived,
        E::InappropriateHandshakeMessage { .. } | E::InappropriateMessage { .. } => {
            Refusal::ProtocolError
        }
        E::NoApplicationProtocol => Refusal::NoAlpn,
        E::InvalidMessage(_) => Refusal::NotTls,
        _ => Refusal::TlsError,
    }
}

/// Why a federated bundle was not taken.
#[derive(Debug, thiserror::Error)]
pub enum FederationTrustError {
    #[error("trust domain {0} is this mesh's own: its roots come from its own CA, never from federation")]
    OwnTrustDomain(TrustDomain),
}

/// The SPIFFE checks both ends apply to a peer's leaf after the path check.
#[derive(Clone, Debug)]
pub struct PeerChecks {
    /// Our trust domain. A peer must belong to it or to a federated trust domain of the
    /// [`Trust`] the chain was verified with.
    pub trust_domain: TrustDomain,
    /// Serials that must be refused.
    pub revoked: RevokedSet,
}

impl PeerChecks {
    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        trust: &Trust,
    ) -> Result<crate::identity::CertInfo, rustls::Error> {
        let info = inspect_cert(leaf).map_err(|e| reject(Refusal::BadSpiffeId, e.to_string()))?;
        match info.check_leaf_profile() {
            Ok(()) => {}
            Err(crate::identity::IdentityError::LeafIsCa) => {
                let detail = format!("{} is a CA certificate", info.id);
                return Err(reject(Refusal::LeafIsCa, detail));
            }
            Err(e) => return Err(reject(Refusal::BadKeyUsage, format!("{}: {e}", info.id))),
        }
        let td = info.id.trust_domain();
        if !info.id.is_member_of(&self.trust_domain) && !trust.is_federated(td) {
            return Err(reject(
                Refusal::WrongTrustDomain,
                format!(
                    "{} is not in trust domain {} nor in a federated one",
                    info.id, self.trust_domain
                ),
            ));
        }
        if self.revoked.load().contains(&info.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(info)
    }
}

/// Server side: the client must present a certificate chaining to the bundle (webpki) that is
/// an X.509-SVID of our trust domain and not revoked. Who may talk to whom is decided after.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Arc<Trust>,
    checks: PeerChecks,
}

impl SpiffeClientVerifier {
    /// Trusts `trust`'s bundle (as it is at each handshake), applies `checks`.
    pub fn new(trust: Arc<Trust>, checks: PeerChecks) -> Self {
        Self { trust, checks }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA hints: SVID holders have one certificate, and the bundle can change.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The bundle is read only when the chain must be checked.
        let by = Presenter::Client;
        let path = self
            .trust
            .verify_path_cached(by, end_entity, intermediates, now, || {
                let roots = self.trust.roots_for(end_entity);
                super::verify_path(&roots, by, end_entity, intermediates, now)
            });
        if let Err(e) = path {
            // webpki refuses a CA certificate as end entity before the SPIFFE check runs, with an
            // error rustls has no variant for (`Other`): report it as that check would.
            let other = matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::Other(_))
            );
            if other && inspect_cert(end_entity).is_ok_and(|i| i.is_ca) {
                let detail = "a CA certificate was presented as a client SVID".to_string();
                return Err(reject(Refusal::LeafIsCa, detail));
            }
            return Err(e);
        }
        self.checks.check(end_entity, &self.trust)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        REFUSE_TLS12
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

/// Client side: the server's chain, SPIFFE profile, trust domain, revocation, then the
/// expected identity of the destination.
#[derive(Debug)]
pub struct MeshServerVerifier {
    trust: Arc<Trust>,
    expected: ExpectedPeer,
    checks: PeerChecks,
}

impl MeshServerVerifier {
    /// Verifies servers against `trust`'s bundle, expecting `expected`.
    pub fn new(trust: Arc<Trust>, expected: ExpectedPeer, checks: PeerChecks) -> Self {
        Self {
            trust,
            expected,
            checks,
        }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust
            .verify_path_cached(Presenter::Server, end_entity, intermediates, now, || {
                let roots = self.trust.roots_for(end_entity);
                super::verify_path(&roots, Presenter::Server, end_entity, intermediates, now)
            })?;
        super::check_server_identity(&self.expected, end_entity)?;
        // Trust domain and revocation after the path, so an unknown issuer is reported as such.
        self.checks.check(end_entity, &self.trust)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        REFUSE_TLS12
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

/// Hands the newest SVID to every handshake, as server and as client. Empty until the
/// identity task publishes one: handshakes then fail (fail closed).
#[derive(Debug, Default)]
pub struct SvidResolver(pub ArcSwapOption<CertifiedKey>);

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Inbound (server) mTLS configuration.
pub fn server_config(
    verifier: Arc<SpiffeClientVerifier>,
    resolver: Arc<SvidResolver>,
    resumption: bool,
    clock: &Clock,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_details(provider(), Arc::new(clock.clone()))
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    if resumption {
        // A resumed session skips certificate verification in rustls, so the sidecar re-checks
        // the stored chain after every resumed handshake (`recheck_resumed_*`): revocation and
        // expiry hold for resumed sessions too.
        // Tickets are single-use in TLS 1.3; a few per connection let concurrent new
        // connections to the same sidecar all resume.
        cfg.send_tls13_tickets = 4;
        // Started over at each rotation of ours (see `resumption`).
        cfg.session_storage =
            resumption::ServerSessions::new(resolver.clone(), clock.clone(), 1024);
    } else {
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(cfg)
}

/// Outbound (client) mTLS configuration for one destination.
pub fn client_config(
    verifier: Arc<MeshServerVerifier>,
    resolver: Arc<SvidResolver>,
    resumption: bool,
    clock: &Clock,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_details(provider(), Arc::new(clock.clone()))
        .with_protocol_versions(TLS13_ONLY)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    cfg.resumption = if resumption {
        // Started over at each rotation of ours (see `resumption`).
        rustls::client::Resumption::store(resumption::ClientSessions::new(
            resolver,
            clock.clone(),
            256,
        ))
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(cfg)
}

fn unix_now(clock: &Clock) -> UnixTime {
    UnixTime::since_unix_epoch(
        clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// The peer's stored chain (leaf, rest) after a resumed handshake; `None` after a full one.
#[allow(clippy::type_complexity)]
fn resumed_chain<D>(
    conn: &rustls::ConnectionCommon<D>,
) -> Result<Option<(&CertificateDer<'static>, &[CertificateDer<'static>])>, rustls::Error> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return Ok(None);
    }
    conn.peer_certificates()
        .and_then(<[_]>::split_first)
        .map(Some)
        .ok_or(rustls::Error::NoCertificatesPresented)
}

/// rustls does not re-verify the peer on a resumed TLS 1.3 handshake; this re-runs the inbound
/// verifier on the chain stored with the session, at the current time with the current bundle
/// and revocation list. A no-op for full handshakes.
pub fn recheck_resumed_client(
    conn: &rustls::ServerConnection,
    verifier: &SpiffeClientVerifier,
    clock: &Clock,
) -> Result<(), rustls::Error> {
    let Some((leaf, rest)) = resumed_chain(conn)? else {
        return Ok(());
    };
    verifier
        .verify_client_cert(leaf, rest, unix_now(clock))
        .map(|_| ())
}

/// The outbound counterpart of [`recheck_resumed_client`]: a server resumed from a ticket is
/// verified again (validity, bundle, revocation, expected identity).
pub fn recheck_resumed_server(
    conn: &rustls::ClientConnection,
    verifier: &MeshServerVerifier,
    clock: &Clock,
) -> Result<(), rustls::Error> {
    let Some((leaf, rest)) = resumed_chain(conn)? else {
        return Ok(());
    };
    let name = ServerName::try_from("resumed.invalid").expect("static name");
    verifier
        .verify_server_cert(leaf, rest, &name, &[], unix_now(clock))
        .map(|_| ())
}

mod resumption;
#[cfg(test)]
mod tests;
