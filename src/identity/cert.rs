//! Reading the facts trustline relies on out of an X.509 certificate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::ids::REGION_PATH_PREFIX;
use super::{IdentityError, Serial, SpiffeId};
use crate::region::Region;

/// What a certificate says about itself (not yet whether anyone vouches for it).
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// The single SPIFFE URI SAN.
    pub id: SpiffeId,
    /// The serial number.
    pub serial: Serial,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Basic constraints say CA:TRUE.
    pub is_ca: bool,
    /// The key usage extension, if present: (digitalSignature, keyCertSign or cRLSign).
    pub key_usage: Option<(bool, bool)>,
}

/// Clock skew allowance of our CAs: certificates start this long before they are signed, so a
/// verifier whose clock is up to this much behind the CA's accepts a certificate at once (as
/// Kubernetes' CSR signer backdates by 5 minutes). A verifier ahead of the CA sees certificates
/// expire that much earlier, which renewal at about half-life absorbs. README: "Clock skew".
pub const BACKDATE: Duration = Duration::from_secs(300);

impl CertInfo {
    /// How long a certificate of our CAs was issued for: its validity less the backdating of
    /// `not_before` (which absorbs clock skew and is no part of the lifetime the CA granted).
    pub fn issued_lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
            .saturating_sub(BACKDATE)
    }

    /// The X.509-SVID profile of a leaf beyond its one SPIFFE URI SAN: CA:FALSE, and a key
    /// usage with digitalSignature and neither keyCertSign nor cRLSign (X509-SVID spec 4.3).
    pub fn check_leaf_profile(&self) -> Result<(), IdentityError> {
        if self.is_ca {
            return Err(IdentityError::LeafIsCa);
        }
        match self.key_usage {
            Some((true, false)) => Ok(()),
            Some((_, true)) => Err(IdentityError::LeafKeyUsage(
                "keyCertSign or cRLSign is set".into(),
            )),
            Some((false, _)) => Err(IdentityError::LeafKeyUsage(
                "digitalSignature is missing".into(),
            )),
            None => Err(IdentityError::LeafKeyUsage(
                "the keyUsage extension is missing".into(),
            )),
        }
    }
}

fn to_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Parses a certificate and extracts its SPIFFE facts. Requires exactly one URI SAN holding a
/// valid SPIFFE ID; other SAN types (DNS, IP) are allowed beside it.
pub fn inspect_cert(der: &CertificateDer<'_>) -> Result<CertInfo, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(format!("subjectAltName: {e}")))?;
    let uris: Vec<&str> = sans
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris.len() != 1 {
        return Err(IdentityError::UriSanCount(uris.len()));
    }
    let id = super::parse_id(uris[0])
        .map_err(|e| IdentityError::BadSanId(format!("{:?}: {e}", uris[0])))?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| IdentityError::Malformed(format!("basicConstraints: {e}")))?
        .map(|bc| bc.value.ca)
        .unwrap_or(false);
    let key_usage = cert
        .key_usage()
        .map_err(|e| IdentityError::Malformed(format!("keyUsage: {e}")))?
        .map(|ku| {
            let ku = ku.value;
            (ku.digital_signature(), ku.key_cert_sign() || ku.crl_sign())
        });
    let validity = cert.validity();
    Ok(CertInfo {
        id,
        serial: Serial::from_bytes(cert.tbs_certificate.raw_serial()),
        not_before: to_time(validity.not_before.timestamp()),
        not_after: to_time(validity.not_after.timestamp()),
        is_ca,
        key_usage,
    })
}

/// The region of the CA that issued a chain's leaf: the last segment of the
/// `spiffe://TD/trustline/region/NAME` URI SAN of the certificate right after the leaf, which
/// must be a CA of the leaf's own trust domain. `None` for leaves issued directly by a root, and
/// for anything else after the leaf.
///
/// Only meaningful for a chain that was verified by [`crate::tls::verify_path`] (every verifier
/// of trustline), which refuses chains that are not exactly their verified path: the
/// certificate after the leaf is then the one that signed it.
pub fn region_of_chain(chain: &[CertificateDer<'_>]) -> Option<Region> {
    let leaf = inspect_cert(chain.first()?).ok()?;
    let issuer = inspect_cert(chain.get(1)?).ok()?;
    let name = issuer.id.path().strip_prefix(REGION_PATH_PREFIX)?;
    let ours = issuer.id.trust_domain() == leaf.id.trust_domain();
    if !(issuer.is_ca && ours) {
        return None;
    }
    Region::new(name).ok()
}

/// The region of a peer's verified chain, for a peer of our trust domain `ours` only: a
/// federated trust domain's CA names its intermediates as it likes, and its
/// `trustline/region/NAME` means nothing here (it must never pass for one of our regions).
pub fn peer_region(chain: &[CertificateDer<'_>], ours: &super::TrustDomain) -> Option<Region> {
    let leaf = inspect_cert(chain.first()?).ok()?;
    if leaf.id.trust_domain() != ours {
        return None;
    }
    region_of_chain(chain)
}

/// Whether a certificate may sign certificates: basic constraints CA:TRUE, and keyCertSign if
/// it has a key usage (RFC 5280 4.2.1.3 and 6.1.4 (n); X509-SVID spec 4.3). webpki checks the CA
/// flag of intermediates but not their key usage, nor anything of a trust anchor.
pub fn can_sign_certificates(der: &CertificateDer<'_>) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let signs = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    ca && signs
}
