//! Trust bundles (src/identity/mod.rs `Bundle::from_pem`, as read from `bundle = "..."`, a CA's
//! `/v1/bundle` answer or a peer's bundle) and the SPIFFE JSON bundle the CA publishes from
//! them (src/ca/bundle_json.rs, `GET /v1/bundle` with `Accept: application/json`).
//!
//! Input: a mode byte, then PEM text, or DER certificates (each after a two-byte big-endian
//! length) that are written out as PEM, as a bundle file would hold them.
//!
//! Beyond "no panic": a bundle prints to PEM that reads back to the same roots; its JSON form is
//! valid JSON with no more keys than roots, and each key's `x5c` is one of the roots, byte for
//! byte; the verifying store holds no more roots than given.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::CertificateDer;
use trustline::ca::bundle_json::spiffe_bundle;
use trustline::identity::{chain_to_pem, parse_trust_domain, Bundle};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let pem = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut ders: Vec<CertificateDer<'static>> = Vec::new();
        let mut r = rest;
        while let [a, b, tail @ ..] = r {
            let n = (usize::from(*a) << 8 | usize::from(*b)).min(tail.len());
            ders.push(CertificateDer::from(tail[..n].to_vec()));
            r = &tail[n..];
        }
        chain_to_pem(&ders).into_bytes()
    };
    let td = parse_trust_domain("example.org").expect("trust domain");
    let Ok(b) = Bundle::from_pem(td.clone(), &pem, "fuzz bundle") else {
        return;
    };
    assert!(b.store().len() <= b.roots.len());
    let again = Bundle::from_pem(td, b.to_pem().as_bytes(), "printed bundle")
        .expect("a printed bundle reads back");
    assert_eq!(again.roots, b.roots);
    assert_eq!(again.store().len(), b.store().len());

    let json = spiffe_bundle(&b, 300);
    let text = serde_json::to_string(&json).expect("JSON prints");
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("JSON reads back");
    let keys = parsed["keys"].as_array().expect("keys is an array");
    assert!(keys.len() <= b.roots.len());
    for k in keys {
        assert_eq!(k["use"], "x509-svid");
        let x5c = k["x5c"][0].as_str().expect("x5c holds a string");
        let der = base64::engine::general_purpose::STANDARD
            .decode(x5c)
            .expect("x5c is base64");
        assert!(b.roots.iter().any(|r| r.as_ref() == der), "x5c is no root");
    }
});
