//! The SPIFFE bundle in JWKS form (SPIFFE Trust Domain and Bundle spec, section 4).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};
use x509_parser::oid_registry::OID_SIG_ED25519;
use x509_parser::public_key::PublicKey;

use crate::identity::Bundle;

/// One JWK per root with `use: x509-svid`, the certificate in `x5c`, plus `spiffe_refresh_hint`
/// (seconds) and `spiffe_sequence` (moves with every change of the roots). Every root of the bundle is published (EC P-256, P-384 and
/// P-521, Ed25519 and RSA keys); only a root whose key no JWK can state (DSA, GOST) or that
/// does not parse is left out, and a root of that kind cannot verify a TLS 1.3 peer anyway.
pub fn spiffe_bundle(bundle: &Bundle, refresh_hint_secs: u64) -> Value {
    spiffe_bundle_at(bundle, 1, refresh_hint_secs)
}

/// [`spiffe_bundle`] with its `spiffe_sequence` (what the CA serves: it moves with every change
/// of the published roots).
pub fn spiffe_bundle_at(bundle: &Bundle, sequence: u64, refresh_hint_secs: u64) -> Value {
    let keys: Vec<Value> = bundle
        .roots
        .iter()
        .filter_map(|der| {
            let mut key = jwk(der.as_ref())?;
            key["use"] = json!("x509-svid");
            key["x5c"] = json!([STANDARD.encode(der.as_ref())]);
            Some(key)
        })
        .collect();
    json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    })
}

/// The public key of a certificate as JWK members (RFC 7518 section 6, RFC 8037 for Ed25519).
fn jwk(der: &[u8]) -> Option<Value> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let spki = cert.public_key();
    let raw = spki.subject_public_key.data.as_ref();
    if spki.algorithm.algorithm == OID_SIG_ED25519 {
        return Some(json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(raw)}));
    }
    match spki.parsed().ok()? {
        PublicKey::EC(_) => {
            // Uncompressed point: 0x04 || X || Y.
            let (crv, n) = match raw.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                133 => ("P-521", 66),
                _ => return None,
            };
            if raw[0] != 4 {
                return None;
            }
            Some(json!({
                "kty": "EC",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(&raw[1..1 + n]),
                "y": URL_SAFE_NO_PAD.encode(&raw[1 + n..]),
            }))
        }
        PublicKey::RSA(rsa) => {
            // Base64urlUInt: big-endian without leading zero bytes (RFC 7518 section 2).
            let unsigned = |b: &[u8]| {
                let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                URL_SAFE_NO_PAD.encode(&b[first..])
            };
            Some(json!({"kty": "RSA", "n": unsigned(rsa.modulus), "e": unsigned(rsa.exponent)}))
        }
        _ => None,
    }
}
