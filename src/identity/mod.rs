//! SPIFFE identities and X.509-SVIDs: the typed values every role passes around.
//!
//! Parse at the edge, pass typed values inside: a [`SpiffeId`] is always valid (the `spiffe`
//! crate's type), a [`Serial`] is normalised, and an [`Svid`] holds a chain whose leaf was checked
//! against the SVID profile (exactly one SPIFFE URI SAN, not a CA).

mod cert;
pub mod ids;

pub use cert::{
    can_sign_certificates, inspect_cert, peer_region, region_of_chain, CertInfo, BACKDATE,
};
pub use ids::REGION_PATH_PREFIX;

pub use spiffe::{SpiffeId, TrustDomain};

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// What can be wrong with an identity, a certificate or a bundle.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {value:?}: {reason}")]
    BadId { value: String, reason: String },
    #[error("invalid trust domain {value:?}: {reason}")]
    BadTrustDomain { value: String, reason: String },
    #[error("certificate is not a valid X.509 DER certificate: {0}")]
    Malformed(String),
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    BadSanId(String),
    #[error("certificate is a CA certificate; a leaf SVID must have CA:FALSE")]
    LeafIsCa,
    #[error(
        "leaf key usage: {0}; an X.509-SVID leaf has digitalSignature and signs no certificates"
    )]
    LeafKeyUsage(String),
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain { id: String, expected: String },
    #[error("chain does not verify against the trust bundle: {0}")]
    Untrusted(String),
    #[error("empty certificate chain")]
    EmptyChain,
    #[error("no certificate found in {0}")]
    NoCertificates(String),
    #[error("PEM in {what}: {reason}")]
    Pem { what: String, reason: String },
}

/// Parses any SPIFFE ID (trust-domain-only IDs included), in its one written form: the
/// `spiffe` crate also takes an upper-case scheme or trust domain and lower-cases them, which
/// the SPIFFE-ID spec (section 2) and go-spiffe refuse, so two spellings never name one ID.
pub fn parse_id(value: &str) -> Result<SpiffeId, IdentityError> {
    let id = SpiffeId::new(value).map_err(|e| IdentityError::BadId {
        value: value.to_string(),
        reason: e.to_string(),
    })?;
    if id.to_string() != value {
        return Err(IdentityError::BadId {
            value: value.to_string(),
            reason: format!(
                "the scheme and trust domain of a SPIFFE ID are lower case; write {id}"
            ),
        });
    }
    Ok(id)
}

/// Parses the SPIFFE ID of a workload: a valid SPIFFE ID with a non-empty path.
pub fn parse_workload_id(value: &str) -> Result<SpiffeId, IdentityError> {
    let id = parse_id(value)?;
    if id.path().is_empty() {
        return Err(IdentityError::BadId {
            value: value.to_string(),
            reason: "a workload ID needs a path, e.g. spiffe://example.org/ns/default/sa/web"
                .to_string(),
        });
    }
    Ok(id)
}

/// Parses a trust domain name such as `example.org`.
pub fn parse_trust_domain(value: &str) -> Result<TrustDomain, IdentityError> {
    if value.contains("://") {
        return Err(IdentityError::BadTrustDomain {
            value: value.to_string(),
            reason: "give the bare name, e.g. example.org".to_string(),
        });
    }
    let td = TrustDomain::new(value).map_err(|e| IdentityError::BadTrustDomain {
        value: value.to_string(),
        reason: e.to_string(),
    })?;
    // As for IDs: lower case only (the crate lower-cases what the spec refuses).
    if td.as_str() != value {
        return Err(IdentityError::BadTrustDomain {
            value: value.to_string(),
            reason: format!("a trust domain is lower case; write {td}"),
        });
    }
    Ok(td)
}

/// A certificate serial number, normalised (no leading zero bytes), printed as lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From the raw big-endian bytes of a certificate's serial.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Serial(bytes[first..].to_vec())
    }

    /// Parses hex as printed by trustline or by `openssl x509 -serial` (colons allowed).
    pub fn parse_hex(s: &str) -> Option<Self> {
        crate::util::unhex(s.trim()).map(|b| Self::from_bytes(&b))
    }

    /// The normalised big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Zero normalises to no bytes; print it as openssl does, so the text parses back (a
        // published revocation list with an empty serial is refused whole by peer CAs).
        if self.0.is_empty() {
            return f.write_str("00");
        }
        f.write_str(&crate::util::hex(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// An X.509-SVID with its private key. The key never leaves the process that made it, and it is
/// never printed: `Debug` shows the identity only.
pub struct Svid {
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key of the leaf.
    pub key: PrivateKeyDer<'static>,
    /// Facts of the leaf.
    pub info: CertInfo,
}

impl Svid {
    /// The leaf's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.info.id
    }

    /// The chain as PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        chain_to_pem(&self.chain)
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            info: self.info.clone(),
        }
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.info.id.to_string())
            .field("serial", &self.info.serial)
            .field("not_after", &crate::clock::rfc3339(self.info.not_after))
            .finish_non_exhaustive()
    }
}

/// PEM encoding of a list of certificates.
pub fn chain_to_pem(chain: &[CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for c in chain {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Reads every certificate in a PEM text; `what` names the source in errors.
pub fn certs_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificates(what.to_string()));
    }
    Ok(certs)
}

/// The trust roots of a trust domain, ready for verification.
///
/// Roots are kept per trust domain: a root whose SPIFFE ID (`spiffe://TD` URI SAN) names another
/// trust domain is carried (published, written out) but never vouches for this one's
/// identities. A root with no SPIFFE ID counts as this trust domain's: whoever configured the
/// bundle said so. A root that may not sign certificates (not CA:TRUE, or a keyUsage without
/// keyCertSign; X509-SVID spec 4.1 and 4.3) is carried but never trusted either: a trust
/// anchor's own extensions are not checked by the path builder.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// The trust domain these roots speak for.
    pub trust_domain: TrustDomain,
    /// Every root certificate given, this trust domain's and others'.
    pub roots: Vec<CertificateDer<'static>>,
    /// The roots of `trust_domain` alone.
    store: Arc<RootCertStore>,
}

/// Which trust domain a root speaks for, by its SPIFFE URI SAN.
enum RootDomain {
    /// No SPIFFE URI at all: the bundle's own (whoever configured it said so).
    Unnamed,
    Named(TrustDomain),
    /// A SAN that does not parse, or a `spiffe://` URI that is not a valid SPIFFE ID: never
    /// taken for ours (fail closed).
    Unreadable,
}

fn root_domain(cert: &CertificateDer<'_>) -> RootDomain {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return RootDomain::Unreadable;
    };
    let sans = match c.subject_alternative_name() {
        Ok(Some(s)) => s,
        Ok(None) => return RootDomain::Unnamed,
        Err(_) => return RootDomain::Unreadable,
    };
    let spiffe = sans.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u)
            if u.get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")) =>
        {
            Some(*u)
        }
        _ => None,
    });
    match spiffe.map(parse_id) {
        None => RootDomain::Unnamed,
        Some(Ok(id)) => RootDomain::Named(id.trust_domain().clone()),
        Some(Err(_)) => RootDomain::Unreadable,
    }
}

impl Bundle {
    /// Builds a bundle from root certificates; only those of `trust_domain` (or naming none)
    /// verify its identities.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let mut store = RootCertStore::empty();
        for r in &roots {
            let ours = match root_domain(r) {
                RootDomain::Unnamed => true,
                RootDomain::Named(td) => td == trust_domain,
                RootDomain::Unreadable => false,
            } && can_sign_certificates(r);
            if !ours {
                continue;
            }
            store
                .add(r.clone())
                .map_err(|e| IdentityError::Untrusted(format!("bad root certificate: {e}")))?;
        }
        Ok(Bundle {
            trust_domain,
            roots,
            store: Arc::new(store),
        })
    }

    /// Reads a bundle PEM file; `what` names it in errors.
    pub fn from_pem(
        trust_domain: TrustDomain,
        pem: &[u8],
        what: &str,
    ) -> Result<Self, IdentityError> {
        Self::new(trust_domain, certs_from_pem(pem, what)?)
    }

    /// The roots as a rustls store.
    pub fn store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }

    /// The roots as PEM.
    pub fn to_pem(&self) -> String {
        chain_to_pem(&self.roots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz target spiffe_id (fuzz/regressions/spiffe_id/zero-serial): `00` parsed to
    /// an empty serial that printed as "", which no parser reads back.
    #[test]
    fn a_zero_serial_prints_as_hex_that_parses_back() {
        for text in ["00", "0000", "00:00"] {
            let s = Serial::parse_hex(text).unwrap();
            assert_eq!(s.to_string(), "00");
            assert_eq!(Serial::parse_hex(&s.to_string()), Some(s));
        }
        assert_eq!(Serial::parse_hex("000a").unwrap().to_string(), "0a");
    }

    fn root(uri: Option<&str>) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        if let Some(u) = uri {
            p.subject_alt_names = vec![rcgen::SanType::URI(u.try_into().unwrap())];
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn only_roots_of_the_bundles_trust_domain_or_naming_none_verify_its_identities() {
        let td = parse_trust_domain("mesh.test").unwrap();
        let trusted = |uri: Option<&str>| {
            let b = Bundle::new(td.clone(), vec![root(uri)]).unwrap();
            assert_eq!(b.roots.len(), 1, "every root is carried");
            !b.store().is_empty()
        };
        assert!(trusted(None));
        assert!(trusted(Some("spiffe://mesh.test")));
        assert!(!trusted(Some("spiffe://other.test")));
        // Not a valid SPIFFE ID (upper case): not taken for ours either.
        assert!(!trusted(Some("spiffe://Other.Test")));
        assert!(!trusted(Some("SPIFFE://other.test")));
    }
}
