//! Reading a fetched SPIFFE bundle document (SPIFFE Trust Domain and Bundle spec, section 4,
//! by [`crate::jwt::parse_spiffe_bundle`]), and the rules a federated bundle must pass before it
//! is trusted: at least one x509-svid root, every root a CA certificate.

use crate::identity::{can_sign_certificates, TrustDomain};
use crate::jwt::SpiffeBundleDoc;

use super::FederationError;

/// Largest bundle document read.
pub const MAX_DOCUMENT: usize = 1024 * 1024;

/// Parses `json` as trust domain `td`'s bundle document and applies the rules of a federated
/// bundle.
pub fn parse(td: &TrustDomain, json: &[u8]) -> Result<SpiffeBundleDoc, FederationError> {
    let bad = |reason: String| FederationError::Document {
        trust_domain: td.clone(),
        reason,
    };
    if json.len() > MAX_DOCUMENT {
        return Err(bad(format!(
            "{} bytes, more than {MAX_DOCUMENT}",
            json.len()
        )));
    }
    let mut doc = crate::jwt::parse_spiffe_bundle(td, json).map_err(|e| bad(e.to_string()))?;
    // A region is ours to vouch for: the `region` member of another trust domain's keys means
    // nothing here, and a JWT-SVID it signed never passes for one of our regions.
    let mut jwt = crate::jwt::JwtBundle::new(td.clone());
    for key in doc.jwt.keys() {
        jwt.insert(key.clone().with_region(None))
            .map_err(|e| bad(e.to_string()))?;
    }
    doc.jwt = jwt;
    if doc.x509_roots.is_empty() {
        return Err(bad("the document names no x509-svid roots".into()));
    }
    if let Some(n) = doc
        .x509_roots
        .iter()
        .position(|r| !can_sign_certificates(r))
    {
        return Err(bad(format!(
            "x509-svid root {n} is not a CA certificate (it needs CA:TRUE and keyCertSign)"
        )));
    }
    Ok(doc)
}
