//! The SPIFFE bundle in JWKS form (SPIFFE Trust Domain and Bundle spec, section 4): thin
//! wrappers over [`crate::jwt::spiffe_bundle_json`], which writes the document (X.509 roots and
//! JWT keys).

use serde_json::Value;

use crate::identity::Bundle;

/// One JWK per root with `use: x509-svid`, the certificate in `x5c` and its RFC 7638 thumbprint
/// as `kid`, plus `spiffe_refresh_hint` (seconds) and `spiffe_sequence` (moves with every change
/// of the roots). Every root of the bundle is published (EC P-256, P-384 and P-521, Ed25519 and
/// RSA keys); only a root whose key no JWK can state (DSA, GOST) or that does not parse is left
/// out, and a root of that kind cannot verify a TLS 1.3 peer anyway.
pub fn spiffe_bundle(bundle: &Bundle, refresh_hint_secs: u64) -> Value {
    spiffe_bundle_at(bundle, 1, refresh_hint_secs)
}

/// [`spiffe_bundle`] with its `spiffe_sequence` (what the CA serves: it moves with every change
/// of the published roots).
pub fn spiffe_bundle_at(bundle: &Bundle, sequence: u64, refresh_hint_secs: u64) -> Value {
    crate::jwt::spiffe_bundle_json(&bundle.roots, &[], sequence, refresh_hint_secs)
}
