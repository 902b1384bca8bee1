//! The SPIFFE bundle in JWKS form (SPIFFE Trust Domain and Bundle spec, section 4).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::identity::Bundle;

/// One JWK per root with `use: x509-svid`, the certificate in `x5c`, plus `spiffe_refresh_hint`
/// (seconds) and `spiffe_sequence`.
pub fn spiffe_bundle(bundle: &Bundle, refresh_hint_secs: u64) -> Value {
    let keys: Vec<Value> = bundle
        .roots
        .iter()
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            let point = cert.public_key().subject_public_key.data.as_ref();
            // Uncompressed EC point: 0x04 || X || Y.
            let (crv, n) = match point.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                _ => return None,
            };
            if point[0] != 4 {
                return None;
            }
            Some(json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(&point[1..1 + n]),
                "y": URL_SAFE_NO_PAD.encode(&point[1 + n..]),
                "x5c": [STANDARD.encode(der.as_ref())],
            }))
        })
        .collect();
    json!({
        "keys": keys,
        "spiffe_sequence": 1,
        "spiffe_refresh_hint": refresh_hint_secs,
    })
}
