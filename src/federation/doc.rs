//! Reading a fetched SPIFFE bundle document (SPIFFE Trust Domain and Bundle spec, section 4),
//! and the rules a federated bundle must pass before it is trusted.
//!
//! A small local reader of the x509-svid keys, `spiffe_sequence` and `spiffe_refresh_hint`; the
//! jwt-svid keys are kept as the JWKs they are (each with a `kid`), for `crate::jwt` to read.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use serde_json::Value;

use super::FederationError;
use crate::identity::{can_sign_certificates, TrustDomain};

/// Largest bundle document read.
pub const MAX_DOCUMENT: usize = 1024 * 1024;
/// Most keys one document may carry.
pub const MAX_KEYS: usize = 4096;

/// A bundle document, read.
#[derive(Clone, Debug, Default)]
pub struct Document {
    pub x509_roots: Vec<CertificateDer<'static>>,
    /// The `jwt-svid` keys, as JWKs.
    pub jwt_keys: Vec<Value>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<Duration>,
}

/// Parses `json` as trust domain `td`'s bundle document and applies the rules of a federated
/// bundle: at least one x509-svid root, every root a CA certificate.
pub fn parse(td: &TrustDomain, json: &[u8]) -> Result<Document, FederationError> {
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
    let v: Value = serde_json::from_slice(json).map_err(|e| bad(format!("not JSON: {e}")))?;
    let keys = v["keys"]
        .as_array()
        .ok_or_else(|| bad("no \"keys\" array".into()))?;
    if keys.len() > MAX_KEYS {
        return Err(bad(format!("{} keys, more than {MAX_KEYS}", keys.len())));
    }
    let mut doc = Document {
        sequence: match &v["spiffe_sequence"] {
            Value::Null => None,
            s => Some(
                s.as_u64()
                    .ok_or_else(|| bad(format!("spiffe_sequence {s} is not a whole number")))?,
            ),
        },
        refresh_hint: match &v["spiffe_refresh_hint"] {
            Value::Null => None,
            h => Some(Duration::from_secs(h.as_u64().ok_or_else(|| {
                bad(format!("spiffe_refresh_hint {h} is not whole seconds"))
            })?)),
        },
        ..Document::default()
    };
    for (n, key) in keys.iter().enumerate() {
        match key["use"].as_str() {
            Some("x509-svid") => doc
                .x509_roots
                .push(x509_root(key).map_err(|e| bad(format!("keys[{n}]: {e}")))?),
            Some("jwt-svid") => {
                if key["kid"].as_str().is_none_or(str::is_empty) {
                    return Err(bad(format!("keys[{n}]: a jwt-svid key needs a \"kid\"")));
                }
                doc.jwt_keys.push(key.clone());
            }
            // The spec: keys of another use are ignored.
            _ => {}
        }
    }
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

/// The one certificate of an x509-svid key's `x5c`.
fn x509_root(key: &Value) -> Result<CertificateDer<'static>, String> {
    let x5c = key["x5c"]
        .as_array()
        .ok_or("an x509-svid key needs \"x5c\"")?;
    let [cert] = x5c.as_slice() else {
        return Err(format!(
            "\"x5c\" holds {} certificates; an x509-svid key holds exactly one",
            x5c.len()
        ));
    };
    let der = STANDARD
        .decode(cert.as_str().ok_or("\"x5c\" holds a non-string")?)
        .map_err(|e| format!("\"x5c\" is not base64: {e}"))?;
    x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("\"x5c\" is not an X.509 certificate: {e}"))?;
    Ok(CertificateDer::from(der))
}
