//! JWT-SVID validation (src/jwt: `validate`) against bundles read from outside input
//! (`parse_spiffe_bundle`, `parse_jwks`: the SPIFFE bundle document of `GET /v1/bundle`, a
//! federated bundle endpoint, FetchJWTBundles).
//!
//! Input: a two-byte big-endian length, that many bytes of bundle JSON (read as trust domain
//! fuzz.example's SPIFFE bundle document, else as its plain JWKS), then the token. The token is
//! validated at a fixed time for audience "orders" against that bundle and example.org's, which
//! holds the fixed key below (region eu-west), so seeds signed with it reach the claim checks
//! (fuzz/scripts/jwt_seeds.py writes them).
//!
//! Beyond "no panic": a parsed document written out by `spiffe_bundle_json` reads back to the
//! same roots, keys, sequence and hint, and `parse_jwks` of it reads the same JWT keys; an
//! accepted token is within the size bound, names the audience, is unexpired, was verified by a
//! key of its sub's trust domain, and reports a region only when that key has one, equal to it.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use trustline::identity::{parse_trust_domain, TrustDomain};
use trustline::jwt::{
    parse_jwks, parse_spiffe_bundle, spiffe_bundle_json, validate, JwtBundle, JwtBundles,
    PublicKey, SigningKey, MAX_TOKEN_LEN,
};
use trustline::region::Region;

/// A P-256 key (PKCS#8, base64), fixed so that seeds can carry valid signatures.
const FIXED_KEY_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglW0B49pMU2lyXMHx0pfnvegMNiHVV80+NVUnPoLNuj+hRANCAATnUFKhs9SekQy0pHV2Erk9sPMprfKrfcM8JELMhcyEq+UVMrvSEUXBDyJME4y1raXOmzHos1JCSO8vNZIvxcVr";

const T0: u64 = 1_800_000_000;

struct World {
    ours: JwtBundle,
    fuzz_td: TrustDomain,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let der = base64::engine::general_purpose::STANDARD
            .decode(FIXED_KEY_PKCS8)
            .expect("key base64");
        let key = SigningKey::from_pkcs8(&der).expect("fixed key");
        let mut ours = JwtBundle::new(parse_trust_domain("example.org").expect("td"));
        ours.insert(key.public(Some(Region::new("eu-west").expect("region"))))
            .expect("insert");
        World {
            ours,
            fuzz_td: parse_trust_domain("fuzz.example").expect("td"),
        }
    })
}

/// The document's round trip through the writer, and parse_jwks agreeing on its JWT keys.
fn check_document(td: &TrustDomain, json: &[u8]) -> Option<JwtBundle> {
    let doc = match parse_spiffe_bundle(td, json) {
        Ok(doc) => doc,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return parse_jwks(td, json).ok();
        }
    };
    let jwks = parse_jwks(td, json).expect("a SPIFFE document reads as a JWKS");
    assert_eq!(jwks, doc.jwt, "parse_jwks and parse_spiffe_bundle disagree");
    let keys: Vec<PublicKey> = doc.jwt.keys().cloned().collect();
    let written = spiffe_bundle_json(
        &doc.x509_roots,
        &keys,
        doc.sequence.unwrap_or(0),
        doc.refresh_hint.map_or(0, |d| d.as_secs()),
    );
    let again = parse_spiffe_bundle(td, written.to_string().as_bytes())
        .expect("a written document reads back");
    assert_eq!(again.x509_roots, doc.x509_roots);
    assert_eq!(again.jwt, doc.jwt);
    assert_eq!(again.sequence, Some(doc.sequence.unwrap_or(0)));
    assert_eq!(again.refresh_hint, Some(doc.refresh_hint.unwrap_or_default()));
    Some(doc.jwt)
}

fuzz_target!(|data: &[u8]| {
    let [hi, lo, rest @ ..] = data else {
        return;
    };
    let n = (usize::from(*hi) << 8 | usize::from(*lo)).min(rest.len());
    let (json, token) = rest.split_at(n);
    let w = world();
    let mut bundles = JwtBundles::from(w.ours.clone());
    if let Some(b) = check_document(&w.fuzz_td, json) {
        bundles.insert(b);
    }
    let token = String::from_utf8_lossy(token);
    let now = UNIX_EPOCH + Duration::from_secs(T0);
    let v = match validate(&token, &bundles, "orders", now) {
        Ok(v) => v,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(token.len() <= MAX_TOKEN_LEN);
    assert!(v.aud.iter().any(|a| a == "orders"));
    assert!(v.exp > T0);
    let bundle = bundles
        .get(v.sub.trust_domain())
        .expect("validated by a bundle of the sub's trust domain");
    let key = bundle.get(&v.kid).expect("validated by a key of that bundle");
    match key.region() {
        None => assert_eq!(v.region, None, "an unverified region was reported"),
        Some(r) => {
            assert_eq!(v.region.as_ref(), Some(r));
            assert_eq!(v.claims["region"], r.as_str());
        }
    }
});
