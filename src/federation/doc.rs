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
    let doc = crate::jwt::parse_spiffe_bundle(td, json).map_err(|e| bad(e.to_string()))?;
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
