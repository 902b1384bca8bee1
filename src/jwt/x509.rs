//! The public key of an X.509 root as JWK members (RFC 7518 section 6, RFC 8037 for Ed25519),
//! for the `x509-svid` keys of a SPIFFE bundle document.

use serde_json::{json, Map, Value};
use x509_parser::oid_registry::OID_SIG_ED25519;
use x509_parser::public_key::PublicKey as SpkiKey;

use super::json::b64url_encode;

/// The JWK members (kty, crv/x/y, n/e) of a certificate's key: EC P-256, P-384 and P-521,
/// Ed25519 and RSA. None for a certificate that does not parse or a key no JWK can state (DSA,
/// GOST), which cannot verify a TLS 1.3 peer anyway.
pub(crate) fn cert_jwk(der: &[u8]) -> Option<Map<String, Value>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let spki = cert.public_key();
    let raw = spki.subject_public_key.data.as_ref();
    let v = if spki.algorithm.algorithm == OID_SIG_ED25519 {
        json!({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)})
    } else {
        match spki.parsed().ok()? {
            SpkiKey::EC(_) => {
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
                json!({
                    "kty": "EC",
                    "crv": crv,
                    "x": b64url_encode(&raw[1..1 + n]),
                    "y": b64url_encode(&raw[1 + n..]),
                })
            }
            SpkiKey::RSA(rsa) => {
                // Base64urlUInt: big-endian without leading zero bytes (RFC 7518 section 2).
                let unsigned = |b: &[u8]| {
                    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                    b64url_encode(&b[first..])
                };
                json!({"kty": "RSA", "n": unsigned(rsa.modulus), "e": unsigned(rsa.exponent)})
            }
            _ => return None,
        }
    };
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}
