//! rustls configuration shared by every role: one provider (aws-lc-rs), TLS 1.3 only, hybrid
//! post-quantum key exchange preferred, and the SPIFFE server verifier.
//!
//! The stock `WebPkiServerVerifier` checks DNS names, which X.509-SVIDs do not carry, so clients
//! use [`SpiffeServerVerifier`]: the chain to the bundle, then exactly one URI SAN, then the
//! expected ID or trust domain. The server side uses rustls' `WebPkiClientVerifier` (path only)
//! and each role checks the SPIFFE ID after the handshake.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

pub mod mesh;

use crate::crypto::provider;
use crate::identity::{inspect_cert, Bundle, CertInfo, IdentityError, SpiffeId, TrustDomain};

/// Which server identities a client accepts.
#[derive(Clone, Debug)]
pub enum ExpectedPeer {
    /// Exactly one of these SPIFFE IDs.
    AnyOf(Vec<SpiffeId>),
    /// Any ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl ExpectedPeer {
    /// Whether `id` is acceptable.
    pub fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            ExpectedPeer::AnyOf(ids) => ids.contains(id),
            ExpectedPeer::TrustDomain(td) => id.is_member_of(td),
        }
    }
}

/// Client-side verifier of a server's X.509-SVID: chain to the bundle, exactly one SPIFFE URI
/// SAN, leaf not a CA, and the ID expected for this destination. The TLS server name is ignored.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: ExpectedPeer,
}

impl SpiffeServerVerifier {
    /// A verifier trusting `roots` and accepting `expected`.
    pub fn new(roots: Arc<RootCertStore>, expected: ExpectedPeer) -> Self {
        Self { roots, expected }
    }
}

/// The server-side SPIFFE check shared by every client verifier: chain to `roots`, exactly one
/// SPIFFE URI SAN, leaf not a CA, identity accepted by `expected`. The TLS server name is ignored.
pub fn verify_spiffe_server(
    roots: &RootCertStore,
    expected: &ExpectedPeer,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<ServerCertVerified, rustls::Error> {
    verify_path(roots, Presenter::Server, end_entity, intermediates, now)?;
    check_server_identity(expected, end_entity)?;
    Ok(ServerCertVerified::assertion())
}

/// Which end presented a chain: client and server chains pass different checks (the extended
/// key usage), so one is never taken for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presenter {
    Client = 1,
    Server = 2,
}

/// The path and signature checks of a peer's chain to `roots` at `now`, for the key usage of
/// `by`, with one rule more than webpki's: the verified path must be exactly the chain the peer
/// sent, in the order sent (a copy of a root at its end aside). Facts of the peer, such as its
/// region, are read from the certificate after its leaf, so nothing the peer sent may stand
/// beside the path: a home-made CA certificate claiming another region, appended to a real
/// chain, would otherwise be skipped by the path builder and still be read.
pub fn verify_path(
    roots: &RootCertStore,
    by: Presenter,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let sent = without_trailing_roots(intermediates, roots);
    if let Some(i) = sent
        .iter()
        .position(|c| !crate::identity::can_sign_certificates(c))
    {
        return Err(mesh::reject(
            crate::refusal::Refusal::UnknownIssuer,
            format!(
                "certificate {} after the leaf may not sign certificates (it needs CA:TRUE and \
                 keyCertSign)",
                i + 1
            ),
        ));
    }
    let stray = std::cell::Cell::new(false);
    let whole_chain = |path: &webpki::VerifiedPath<'_>| {
        let mut used = path.intermediate_certificates();
        let same = sent
            .iter()
            .all(|c| used.next().is_some_and(|u| u.der().as_ref() == c.as_ref()))
            && used.next().is_none();
        if same {
            Ok(())
        } else {
            stray.set(true);
            // Not fatal to webpki: it goes on looking for a path that uses the whole chain.
            Err(webpki::Error::UnknownIssuer)
        }
    };
    let usage = match by {
        Presenter::Client => webpki::KeyUsage::client_auth(),
        Presenter::Server => webpki::KeyUsage::server_auth(),
    };
    let verified = ee.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &roots.roots,
        sent,
        now,
        usage,
        None,
        Some(&whole_chain),
    );
    match verified {
        Ok(_) => Ok(()),
        Err(_) if stray.get() => Err(mesh::reject(
            crate::refusal::Refusal::StrayCertificate,
            format!(
                "the chain carries {} certificate(s) after the leaf, and they are not exactly its \
                 verified path to the trust bundle",
                sent.len()
            ),
        )),
        Err(e) => Err(pki_error(e)),
    }
}

/// Verifies an SVID chain (leaf first) against `bundle`'s roots at `now`: path to a root, validity,
/// the SVID profile of the leaf, and membership of this trust domain.
pub fn verify_svid_chain(
    bundle: &Bundle,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<CertInfo, IdentityError> {
    let (leaf, intermediates) = chain.split_first().ok_or(IdentityError::EmptyChain)?;
    let info = inspect_cert(leaf)?;
    info.check_leaf_profile()?;
    if !info.id.is_member_of(&bundle.trust_domain) {
        return Err(IdentityError::WrongTrustDomain {
            id: info.id.to_string(),
            expected: bundle.trust_domain.to_string(),
        });
    }
    let now = UnixTime::since_unix_epoch(
        now.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let by = Presenter::Server;
    verify_path(&bundle.store(), by, leaf, intermediates, now)
        .map_err(|e| IdentityError::Untrusted(e.to_string()))?;
    Ok(info)
}

/// `chain` without a copy of a trusted root at its end (senders may include the root). A copy
/// has a trusted root's subject and key *and* is signed by that key: a home-made certificate
/// that merely borrows a root's name and public key (to be read as the issuer of a leaf the
/// root signed) stays in the chain, and the path check then refuses it. One copy at most: each
/// costs a signature check before the peer is authenticated, and a chain padded with copies
/// (a 64 KiB handshake message holds a hundred) would make every handshake pay for them.
fn without_trailing_roots<'a, 'c>(
    chain: &'a [CertificateDer<'c>],
    roots: &RootCertStore,
) -> &'a [CertificateDer<'c>] {
    let Some((last, rest)) = chain.split_last() else {
        return chain;
    };
    let is_root = webpki::anchor_from_trusted_cert(last).is_ok_and(|a| {
        roots.roots.iter().any(|r| {
            r.subject == a.subject && r.subject_public_key_info == a.subject_public_key_info
        })
    }) && self_signed(last);
    if is_root {
        rest
    } else {
        chain
    }
}

/// Whether `cert` carries a valid signature by its own key.
fn self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .is_ok_and(|(_, c)| c.verify_signature(None).is_ok())
}

/// A webpki error as rustls reports it (the mapping rustls' own verifiers use), so metrics keep
/// their labels.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    use webpki::Error as W;
    let c = match e {
        W::BadDer | W::BadDerTime | W::TrailingData(_) => C::BadEncoding,
        W::CertNotValidYet { time, not_before } => C::NotValidYetContext { time, not_before },
        W::CertExpired { time, not_after } => C::ExpiredContext { time, not_after },
        W::InvalidCertValidity => C::Expired,
        W::UnknownIssuer => C::UnknownIssuer,
        W::CertRevoked => C::Revoked,
        W::InvalidSignatureForPublicKey => C::BadSignature,
        // One label for every unsupported-algorithm case; the context is not needed.
        #[allow(deprecated)]
        W::UnsupportedSignatureAlgorithm
        | W::UnsupportedSignatureAlgorithmForPublicKey
        | W::UnsupportedSignatureAlgorithmContext(_)
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            C::UnsupportedSignatureAlgorithm
        }
        #[allow(deprecated)]
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => C::InvalidPurpose,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

/// Exactly one SPIFFE URI SAN, leaf not a CA, identity accepted by `expected`.
pub fn check_server_identity(
    expected: &ExpectedPeer,
    end_entity: &CertificateDer<'_>,
) -> Result<(), rustls::Error> {
    let info = inspect_cert(end_entity).map_err(|e| other_err(e.to_string()))?;
    if info.is_ca {
        return Err(other_err(
            "server presented a CA certificate as its leaf".into(),
        ));
    }
    if !expected.accepts(&info.id) {
        return Err(mesh::unexpected_identity(format!(
            "server identity {} is not the expected {expected:?}",
            info.id
        )));
    }
    Ok(())
}

/// What every trustline verifier answers to a TLS 1.2 signature: trustline speaks TLS 1.3 only.
pub const REFUSE_TLS12: Result<HandshakeSignatureValid, rustls::Error> = Err(
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered),
);

/// TLS 1.3 handshake signature check with the provider's algorithms.
pub fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// The signature schemes the provider verifies.
pub fn verify_schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

fn other_err(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(std::io::Error::other(msg)),
    )))
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_spiffe_server(&self.roots, &self.expected, end_entity, intermediates, now)
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
