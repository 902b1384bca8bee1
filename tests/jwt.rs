//! JWT-SVIDs (src/jwt): signing and validation, the refusals a validator owes (expiry, audience,
//! unknown keys and trust domains, tampering, alg confusion, region claims, ambiguous encodings,
//! sizes), RSA keys, the SPIFFE bundle document with real CA roots, the `trustline jwt validate`
//! command, and py-spiffe reading what we write (ignored unless TL_PYSPIFFE names its python).

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};
use trustline::identity::{parse_id, parse_trust_domain, SpiffeId, TrustDomain};
use trustline::jwt::{
    parse_jwks, parse_spiffe_bundle, spiffe_bundle_json, validate, Claims, JwtBundle, JwtBundles,
    JwtError, PublicKey, SigningKey, MAX_BUNDLE_KEYS, MAX_BUNDLE_LEN, MAX_TOKEN_LEN,
};
use trustline::region::Region;

const T0: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0)
}

fn td() -> TrustDomain {
    parse_trust_domain("example.org").unwrap()
}

fn web() -> SpiffeId {
    parse_id("spiffe://example.org/ns/shop/sa/web").unwrap()
}

fn region(r: &str) -> Region {
    Region::new(r).unwrap()
}

fn bundles(td: TrustDomain, keys: &[PublicKey]) -> JwtBundles {
    let mut b = JwtBundle::new(td);
    for k in keys {
        b.insert(k.clone()).unwrap();
    }
    JwtBundles::from(b)
}

fn claims(aud: &[&str], reg: Option<&str>) -> Claims {
    Claims::new(
        web(),
        aud.iter().map(|a| a.to_string()).collect(),
        now(),
        Duration::from_secs(300),
        reg.map(region),
    )
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s.as_bytes())
}

/// A token with this header and payload text, signed ES256 by `key`'s P-256 key.
fn craft(key: &SigningKey, header: &str, payload: &str) -> String {
    let pair =
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &key.to_pkcs8())
            .unwrap();
    let input = format!("{}.{}", b64(header), b64(payload));
    let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn header(key: &SigningKey) -> String {
    json!({"alg": "ES256", "kid": key.kid(), "typ": "JWT"}).to_string()
}

fn payload(extra: Value) -> String {
    let mut p = json!({
        "sub": web().to_string(), "aud": "orders", "iat": T0, "exp": T0 + 300, "region": "eu-west"
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            p.as_object_mut().unwrap().remove(k);
        } else {
            p[k] = v.clone();
        }
    }
    p.to_string()
}

/// A key of region eu-west, its bundles, and a validator call at T0 for audience "orders".
struct Fixture {
    key: SigningKey,
    bundles: JwtBundles,
}

impl Fixture {
    fn new() -> Self {
        let key = SigningKey::generate().unwrap();
        let bundles = bundles(td(), &[key.public(Some(region("eu-west")))]);
        Fixture { key, bundles }
    }

    fn check(&self, token: &str) -> Result<trustline::jwt::Validated, JwtError> {
        validate(token, &self.bundles, "orders", now())
    }

    fn refused(&self, token: &str) -> String {
        match self.check(token) {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => e.to_string(),
        }
    }
}

#[test]
fn a_signed_token_validates_with_its_claims() {
    let f = Fixture::new();
    let token = f.key.sign(&claims(&["orders"], Some("eu-west"))).unwrap();
    let v = f.check(&token).unwrap();
    assert_eq!(v.sub, web());
    assert_eq!(v.aud, vec!["orders".to_string()]);
    assert_eq!(v.exp, T0 + 300);
    assert_eq!(v.iat, Some(T0));
    assert_eq!(v.region, Some(region("eu-west")));
    assert_eq!(v.kid, f.key.kid());
    assert_eq!(v.claims["sub"], web().to_string());
    // The header is what the plan says.
    let h: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(h, json!({"alg": "ES256", "kid": f.key.kid(), "typ": "JWT"}));
    // The kid is the RFC 7638 thumbprint of the public JWK.
    assert_eq!(f.key.public(None).thumbprint(), f.key.kid());
}

#[test]
fn expired_and_not_yet_valid_tokens_are_refused() {
    let f = Fixture::new();
    let token = f.key.sign(&claims(&["orders"], Some("eu-west"))).unwrap();
    let at = |s: u64| {
        validate(
            &token,
            &f.bundles,
            "orders",
            UNIX_EPOCH + Duration::from_secs(s),
        )
    };
    assert!(at(T0 + 299).is_ok());
    let e = at(T0 + 300).unwrap_err();
    assert!(
        matches!(e, JwtError::Expired { exp, now } if exp == T0 + 300 && now == T0 + 300),
        "{e}"
    );
    assert!(e.to_string().contains("expired"), "{e}");

    let future = craft(&f.key, &header(&f.key), &payload(json!({"nbf": T0 + 10})));
    let e = f.refused(&future);
    assert!(e.contains("not valid yet (nbf"), "{e}");
    let past = craft(&f.key, &header(&f.key), &payload(json!({"nbf": T0})));
    assert!(f.check(&past).is_ok());

    // exp is required and an integer.
    for (extra, want) in [
        (json!({"exp": null}), "exp: missing"),
        (json!({"exp": (T0 + 300) as f64 + 0.5}), "exp: "),
        (json!({"exp": format!("{}", T0 + 300)}), "is not a number"),
        (json!({"exp": -1}), "not a non-negative integer"),
    ] {
        let e = f.refused(&craft(&f.key, &header(&f.key), &payload(extra)));
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn the_audience_must_be_named_as_a_string_or_in_an_array() {
    let f = Fixture::new();
    let one = f.key.sign(&claims(&["orders"], Some("eu-west"))).unwrap();
    assert!(f.check(&one).is_ok());
    let two = f
        .key
        .sign(&claims(&["billing", "orders"], Some("eu-west")))
        .unwrap();
    assert_eq!(f.check(&two).unwrap().aud, vec!["billing", "orders"]);
    let other = f.key.sign(&claims(&["billing"], Some("eu-west"))).unwrap();
    let e = f.refused(&other);
    assert!(
        e.contains("aud [\"billing\"] does not contain \"orders\""),
        "{e}"
    );

    let h = header(&f.key);
    assert!(f
        .check(&craft(&f.key, &h, &payload(json!({"aud": "orders"}))))
        .is_ok());
    assert!(f
        .check(&craft(
            &f.key,
            &h,
            &payload(json!({"aud": ["x", "orders"]}))
        ))
        .is_ok());
    for (aud, want) in [
        (json!([]), "empty array"),
        (json!(""), "empty audience"),
        (json!(null), "aud: missing"),
        (json!(["orders", 3]), "not a string"),
    ] {
        let e = f.refused(&craft(&f.key, &h, &payload(json!({ "aud": aud }))));
        assert!(e.contains(want), "{aud}: {e}");
    }
    // Nor does the signer make a token without an audience, or one expired when issued.
    assert!(f.key.sign(&claims(&[], None)).is_err());
    assert!(f.key.sign(&claims(&[""], None)).is_err());
    let mut dead = claims(&["orders"], None);
    dead.exp = dead.iat;
    assert!(f
        .key
        .sign(&dead)
        .unwrap_err()
        .to_string()
        .contains("not after iat"));
}

#[test]
fn unknown_keys_and_trust_domains_are_refused() {
    let f = Fixture::new();
    let stranger = SigningKey::generate().unwrap();
    let token = stranger
        .sign(&claims(&["orders"], Some("eu-west")))
        .unwrap();
    let e = f.refused(&token);
    assert!(
        e.contains("is not in the JWT bundle of \"example.org\""),
        "{e}"
    );
    assert!(e.contains(stranger.kid()), "{e}");

    // Our key, but a sub of a trust domain we hold no bundle for.
    let other_td = craft(
        &f.key,
        &header(&f.key),
        &payload(json!({"sub": "spiffe://other.org/ns/shop/sa/web"})),
    );
    let e = f.refused(&other_td);
    assert!(
        e.contains("no JWT bundle for trust domain \"other.org\""),
        "{e}"
    );

    // A sub that is no SPIFFE ID, or in a spelling parse_id refuses.
    for sub in [
        "web",
        "spiffe://Example.org/ns/shop/sa/web",
        "https://example.org/x",
    ] {
        let e = f.refused(&craft(
            &f.key,
            &header(&f.key),
            &payload(json!({ "sub": sub })),
        ));
        assert!(e.contains("JWT claims: sub:"), "{e}");
    }
    // The header must name its key.
    let no_kid = craft(
        &f.key,
        r#"{"alg":"ES256","typ":"JWT"}"#,
        &payload(json!({})),
    );
    assert!(f.refused(&no_kid).contains("kid missing"));
}

#[test]
fn a_tampered_payload_or_signature_is_refused() {
    let f = Fixture::new();
    let token = f.key.sign(&claims(&["orders"], Some("eu-west"))).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let evil = payload(json!({"sub": "spiffe://example.org/ns/shop/sa/admin"}));
    let swapped = format!("{}.{}.{}", parts[0], b64(&evil), parts[2]);
    assert!(f.refused(&swapped).contains("does not verify"));

    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig));
    assert!(f
        .refused(&flipped)
        .contains("JWT signature: does not verify"));

    let cut = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(&sig[..63])
    );
    assert!(f.refused(&cut).contains("does not verify"));
    let empty = format!("{}.{}.", parts[0], parts[1]);
    assert!(f.refused(&empty).contains("JWT signature: empty"));
    let four = format!("{token}.x");
    assert!(f.refused(&four).contains("three parts"));
}

#[test]
fn the_header_alg_must_fit_the_key() {
    let f = Fixture::new();
    let p = payload(json!({}));
    let kid = f.key.kid();
    // Signed by the P-256 key, but the header names another algorithm.
    for alg in ["ES384", "RS256", "PS256"] {
        let t = craft(&f.key, &json!({"alg": alg, "kid": kid}).to_string(), &p);
        let e = f.refused(&t);
        assert!(e.contains(&format!("alg {alg} does not match key")), "{e}");
        assert!(e.contains("EC P-256"), "{e}");
    }
    for alg in ["none", "HS256", "HS512", "es256", "EdDSA"] {
        let t = craft(&f.key, &json!({"alg": alg, "kid": kid}).to_string(), &p);
        let e = f.refused(&t);
        assert!(
            e.contains(&format!("alg \"{alg}\" is not allowed (ES256, ES384")),
            "{e}"
        );
    }
    // HS256 with the public key as the HMAC secret, the classic confusion.
    let h = b64(&json!({"alg": "HS256", "kid": kid}).to_string());
    let input = format!("{h}.{}", b64(&p));
    let secret = f.key.public(None).to_jwk().to_string();
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes()),
        input.as_bytes(),
    );
    let hs = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
    assert!(f.refused(&hs).contains("is not allowed"));
    // alg none, no signature.
    let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&p));
    assert!(f.refused(&none).contains("is not allowed"));

    // A P-384 key verifies ES384 and nothing else.
    let p384 = EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
    let point = p384.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-384", "kid": "k384",
        "x": URL_SAFE_NO_PAD.encode(&point[1..49]), "y": URL_SAFE_NO_PAD.encode(&point[49..])});
    let key = PublicKey::from_jwk(&jwk).unwrap();
    let b = bundles(td(), &[key]);
    let sign384 = |alg: &str| {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": alg, "kid": "k384"}).to_string()),
            b64(&p)
        );
        let sig = p384.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    };
    let v = validate(&sign384("ES384"), &b, "orders", now()).unwrap();
    assert_eq!(v.region, None);
    let e = validate(&sign384("ES256"), &b, "orders", now()).unwrap_err();
    assert!(
        e.to_string()
            .contains("alg ES256 does not match key \"k384\""),
        "{e}"
    );
}

#[test]
fn the_region_claim_must_be_the_keys_region() {
    let f = Fixture::new();
    let missing = f.key.sign(&claims(&["orders"], None)).unwrap();
    let e = f.refused(&missing);
    assert!(
        e.contains("region missing") && e.contains("\"eu-west\""),
        "{e}"
    );
    let other = f.key.sign(&claims(&["orders"], Some("us-east"))).unwrap();
    let e = f.refused(&other);
    assert!(e.contains("region \"us-east\", but key"), "{e}");
    let bad = craft(
        &f.key,
        &header(&f.key),
        &payload(json!({"region": "EU WEST"})),
    );
    assert!(f.refused(&bad).contains("JWT claims: region:"));
    let not_str = craft(&f.key, &header(&f.key), &payload(json!({"region": 7})));
    assert!(f.refused(&not_str).contains("region: 7 is not a string"));
}

#[test]
fn a_federated_key_without_region_never_reports_the_claimed_region() {
    let key = SigningKey::generate().unwrap();
    let b = bundles(td(), &[key.public(None)]);
    let token = key.sign(&claims(&["orders"], Some("eu-west"))).unwrap();
    let v = validate(&token, &b, "orders", now()).unwrap();
    assert_eq!(
        v.region, None,
        "an unverified region claim is not reported as verified"
    );
    assert_eq!(v.claims["region"], "eu-west");
    let none = key.sign(&claims(&["orders"], None)).unwrap();
    assert_eq!(validate(&none, &b, "orders", now()).unwrap().region, None);
}

#[test]
fn duplicate_json_members_are_refused() {
    let f = Fixture::new();
    let kid = f.key.kid();
    let dup_header = format!(r#"{{"alg":"ES256","kid":"{kid}","kid":"{kid}"}}"#);
    let e = f.refused(&craft(&f.key, &dup_header, &payload(json!({}))));
    assert!(
        e.contains("JWT header") && e.contains("duplicate member \"kid\""),
        "{e}"
    );
    let dup_alg = format!(r#"{{"alg":"HS256","kid":"{kid}","alg":"ES256"}}"#);
    assert!(f
        .refused(&craft(&f.key, &dup_alg, &payload(json!({}))))
        .contains("duplicate"));
    let p = payload(json!({}));
    let dup_sub = format!(
        r#"{},"sub":"spiffe://example.org/ns/shop/sa/admin"}}"#,
        &p[..p.len() - 1]
    );
    let e = f.refused(&craft(&f.key, &header(&f.key), &dup_sub));
    assert!(
        e.contains("JWT claims") && e.contains("duplicate member \"sub\""),
        "{e}"
    );
}

#[test]
fn oversized_tokens_are_refused_before_decoding() {
    let f = Fixture::new();
    // Not even base64: the size alone refuses it.
    let e = f.check(&"!".repeat(MAX_TOKEN_LEN + 1)).unwrap_err();
    assert!(matches!(e, JwtError::TooLong { .. }), "{e}");
    let big = craft(
        &f.key,
        &header(&f.key),
        &payload(json!({"pad": "x".repeat(MAX_TOKEN_LEN)})),
    );
    assert!(f.refused(&big).contains("longer than the 8192 allowed"));
}

#[test]
fn padded_or_non_canonical_base64_is_refused() {
    let f = Fixture::new();
    let token = f.key.sign(&claims(&["orders"], Some("eu-west"))).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let pad = |s: &str| {
        let bytes = URL_SAFE_NO_PAD.decode(s).unwrap();
        URL_SAFE.encode(bytes)
    };
    // Pick parts whose padded form differs (length not a multiple of 3).
    for i in 0..3 {
        let mut p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
        p[i] = pad(parts[i]);
        if p[i] == parts[i] {
            p[i].push_str("==");
        }
        let e = f.refused(&p.join("."));
        assert!(e.contains("padding"), "part {i}: {e}");
    }
    // A second spelling of the signature's last byte (non-zero trailing bits) when it has them.
    let sig = parts[2];
    let last = sig.chars().last().unwrap();
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let idx = alphabet.find(last).unwrap();
    // 64-byte signature: 86 characters, the last carries 2 data bits and 4 zero bits.
    let respelled = alphabet.as_bytes()[idx | 1] as char;
    let other = format!(
        "{}.{}.{}{}",
        parts[0],
        parts[1],
        &sig[..sig.len() - 1],
        respelled
    );
    assert!(f.refused(&other).contains("not base64url"));
    // The standard alphabet's characters are not base64url.
    let std_header = STANDARD.encode(header(&f.key)).replace('=', "");
    if std_header.contains(['+', '/']) {
        assert!(f
            .refused(&format!("{std_header}.{}.{}", parts[1], parts[2]))
            .contains("base64"));
    }
}

#[test]
fn header_typ_and_crit_are_checked() {
    let f = Fixture::new();
    let kid = f.key.kid();
    let p = payload(json!({}));
    assert!(f
        .check(&craft(
            &f.key,
            &json!({"alg": "ES256", "kid": kid}).to_string(),
            &p
        ))
        .is_ok());
    assert!(f
        .check(&craft(
            &f.key,
            &json!({"alg": "ES256", "kid": kid, "typ": "JOSE"}).to_string(),
            &p
        ))
        .is_ok());
    let e = f.refused(&craft(
        &f.key,
        &json!({"alg": "ES256", "kid": kid, "typ": "at+jwt"}).to_string(),
        &p,
    ));
    assert!(e.contains("typ"), "{e}");
    let e = f.refused(&craft(
        &f.key,
        &json!({"alg": "ES256", "kid": kid, "crit": ["exp"]}).to_string(),
        &p,
    ));
    assert!(e.contains("crit"), "{e}");
}

/// An RSA key of aws-lc-rs, its JWK (n, e) and a token signed with `alg`.
fn rsa_token(alg: &str) -> (Value, String) {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let spki = pair.public_key().as_der().unwrap();
    let (_, info) =
        <x509_parser::x509::SubjectPublicKeyInfo<'_> as x509_parser::prelude::FromDer<_>>::from_der(
            spki.as_ref(),
        )
        .unwrap();
    let x509_parser::public_key::PublicKey::RSA(rsa) = info.parsed().unwrap() else {
        panic!("not RSA")
    };
    let strip = |b: &[u8]| {
        let i = b.iter().position(|x| *x != 0).unwrap();
        URL_SAFE_NO_PAD.encode(&b[i..])
    };
    let jwk =
        json!({"kty": "RSA", "kid": "rsa-1", "n": strip(rsa.modulus), "e": strip(rsa.exponent)});
    let scheme: &dyn signature::RsaEncoding = match alg {
        "RS256" => &signature::RSA_PKCS1_SHA256,
        "RS512" => &signature::RSA_PKCS1_SHA512,
        "PS256" => &signature::RSA_PSS_SHA256,
        _ => panic!("{alg}"),
    };
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": alg, "kid": "rsa-1", "typ": "JWT"}).to_string()),
        b64(&payload(json!({"region": null})))
    );
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(scheme, &SystemRandom::new(), input.as_bytes(), &mut sig)
        .unwrap();
    (jwk, format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig)))
}

#[test]
fn rsa_signed_tokens_validate_through_the_jwks_n_and_e() {
    for alg in ["RS256", "RS512", "PS256"] {
        let (jwk, token) = rsa_token(alg);
        let key = PublicKey::from_jwk(&jwk).unwrap();
        let b = bundles(td(), std::slice::from_ref(&key));
        let v = validate(&token, &b, "orders", now()).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(v.kid, "rsa-1");
        // The same key given `alg` in its JWK accepts that algorithm only.
        let mut pinned = jwk.clone();
        pinned["alg"] = json!(if alg == "RS256" { "PS256" } else { "RS256" });
        let b = bundles(td(), &[PublicKey::from_jwk(&pinned).unwrap()]);
        let e = validate(&token, &b, "orders", now()).unwrap_err();
        assert!(e.to_string().contains("its JWK says alg"), "{e}");
        // An RSA key does not verify ES256.
        let p = payload(json!({}));
        let fake = format!(
            "{}.{}.AAAA",
            b64(r#"{"alg":"ES256","kid":"rsa-1"}"#),
            b64(&p)
        );
        let e = validate(&fake, &bundles(td(), &[key]), "orders", now()).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not match key \"rsa-1\" (an RSA 2048-bit key"),
            "{e}"
        );
    }
}

#[test]
fn the_bundle_document_round_trips_with_ca_roots_and_jwt_keys() {
    let pki = common::Pki::new("example.org");
    let roots = pki.roots();
    let eu = SigningKey::generate().unwrap();
    let us = SigningKey::generate().unwrap();
    let keys = vec![
        eu.public(Some(region("eu-west"))),
        us.public(Some(region("us-east"))),
    ];
    let doc = spiffe_bundle_json(&roots, &keys, 7, 300);
    let parsed = parse_spiffe_bundle(&td(), doc.to_string().as_bytes()).unwrap();
    assert_eq!(parsed.x509_roots, roots);
    assert_eq!(parsed.sequence, Some(7));
    assert_eq!(parsed.refresh_hint, Some(Duration::from_secs(300)));
    assert_eq!(parsed.jwt.len(), 2);
    assert_eq!(parsed.jwt.get(eu.kid()), Some(&keys[0]));
    assert_eq!(
        parsed.jwt.get(us.kid()).unwrap().region(),
        Some(&region("us-east"))
    );
    // Every key has a kid (py-spiffe needs one); a root's is its key's thumbprint.
    for k in doc["keys"].as_array().unwrap() {
        assert!(k["kid"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    }
    // A token of region us-east validates with the bundle read from the document.
    let token = us.sign(&claims(&["orders"], Some("us-east"))).unwrap();
    let v = validate(
        &token,
        &JwtBundles::from(parsed.jwt.clone()),
        "orders",
        now(),
    )
    .unwrap();
    assert_eq!(v.region, Some(region("us-east")));
    // The plain JWKS form reads back to the same bundle; parse_jwks reads the document's keys.
    let jwks = parsed.jwt.to_jwks();
    assert_eq!(
        parse_jwks(&td(), jwks.to_string().as_bytes()).unwrap(),
        parsed.jwt
    );
    assert_eq!(
        parse_jwks(&td(), doc.to_string().as_bytes()).unwrap(),
        parsed.jwt
    );
    // The CA's existing writer is the same document without JWT keys.
    let old = trustline::ca::bundle_json::spiffe_bundle_at(&pki.bundle(), 7, 300);
    assert_eq!(old, spiffe_bundle_json(&roots, &[], 7, 300));
}

/// The JWK of a fresh key, under `kid`.
fn second_jwk(kid: &str) -> Value {
    let mut k = SigningKey::generate().unwrap().public(None).to_jwk();
    k["kid"] = json!(kid);
    k
}

#[test]
fn bad_bundle_documents_are_refused_with_the_key_named() {
    let pki = common::Pki::new("example.org");
    let roots = pki.roots();
    let key = SigningKey::generate().unwrap();
    let doc = spiffe_bundle_json(&roots, &[key.public(None)], 1, 60);
    let parse =
        |d: &Value| parse_spiffe_bundle(&td(), d.to_string().as_bytes()).map_err(|e| e.to_string());
    let mut two = doc.clone();
    two["keys"][0]["x5c"] = json!([doc["keys"][0]["x5c"][0], doc["keys"][0]["x5c"][0]]);
    let e = parse(&two).unwrap_err();
    assert_eq!(
        e,
        "bundle key 0: x5c must hold exactly one certificate, found 2"
    );
    let mut other_key = doc.clone();
    other_key["keys"][0]["x"] = doc["keys"][1]["x"].clone();
    assert!(parse(&other_key)
        .unwrap_err()
        .contains("bundle key 0: the JWK's x is not the x5c"));
    let mut no_kid = doc.clone();
    no_kid["keys"][1].as_object_mut().unwrap().remove("kid");
    assert!(parse(&no_kid)
        .unwrap_err()
        .contains("bundle key 1: kid missing"));
    let mut no_use = doc.clone();
    no_use["keys"][1].as_object_mut().unwrap().remove("use");
    assert!(parse(&no_use)
        .unwrap_err()
        .contains("bundle key 1: use missing"));
    let mut unknown_use = doc.clone();
    unknown_use["keys"][1]["use"] = json!("wit-svid");
    assert_eq!(
        parse(&unknown_use).unwrap().jwt.len(),
        0,
        "unknown uses are skipped"
    );
    let mut conflict = doc.clone();
    conflict["keys"]
        .as_array_mut()
        .unwrap()
        .push(second_jwk(key.kid()));
    assert!(parse(&conflict).unwrap_err().contains("bundle key 2: kid"));
    let mut twice = doc.clone();
    let mut again = doc["keys"][1].clone();
    again["region"] = json!("us-east");
    twice["keys"].as_array_mut().unwrap().push(again);
    assert!(parse(&twice).unwrap_err().contains("appears twice"));
    // JwtBundle::insert: the same key again is fine, another key under its kid is not.
    let mut b = JwtBundle::new(td());
    b.insert(key.public(None)).unwrap();
    b.insert(key.public(Some(region("eu-west")))).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b.get(key.kid()).unwrap().region(), Some(&region("eu-west")));
    let other = PublicKey::from_jwk(&second_jwk(key.kid())).unwrap();
    assert!(b
        .insert(other)
        .unwrap_err()
        .to_string()
        .contains("two different keys"));
    let mut bad_b64 = doc.clone();
    bad_b64["keys"][0]["x5c"] = json!(["not base64!"]);
    assert!(parse(&bad_b64)
        .unwrap_err()
        .contains("bundle key 0: x5c: not standard base64"));

    let text = doc.to_string();
    let dup = text.replacen(
        "\"spiffe_sequence\":1",
        "\"spiffe_sequence\":1,\"spiffe_sequence\":2",
        1,
    );
    assert_ne!(dup, text);
    assert!(parse_spiffe_bundle(&td(), dup.as_bytes())
        .unwrap_err()
        .to_string()
        .contains("duplicate member"));

    let huge = format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(MAX_BUNDLE_LEN));
    assert!(parse_spiffe_bundle(&td(), huge.as_bytes())
        .unwrap_err()
        .to_string()
        .contains("larger than"));
    let many = json!({"keys": vec![json!({"use": "other"}); MAX_BUNDLE_KEYS + 1]});
    assert!(parse(&many)
        .unwrap_err()
        .contains("more than the 4096 allowed"));
    assert!(parse(&json!({"keys": {}}))
        .unwrap_err()
        .contains("keys is not an array"));
    assert!(parse(&json!({"spiffe_sequence": 1}))
        .unwrap_err()
        .contains("keys missing"));
}

// ---- the command line ----

fn run_cli(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trustline"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn jwt_validate_accepts_a_good_token_and_refuses_a_bad_one() {
    let pki = common::Pki::new("example.org");
    let key = SigningKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let doc_path = dir.path().join("bundle.json");
    let doc = spiffe_bundle_json(&pki.roots(), &[key.public(Some(region("eu-west")))], 3, 300);
    std::fs::write(&doc_path, doc.to_string()).unwrap();
    let jwks_path = dir.path().join("jwks.json");
    let mut jb = JwtBundle::new(td());
    jb.insert(key.public(Some(region("eu-west")))).unwrap();
    std::fs::write(&jwks_path, jb.to_jwks().to_string()).unwrap();
    // Real time: the command uses the system clock.
    #[allow(clippy::disallowed_methods)]
    let t = SystemTime::now();
    let c = Claims::new(
        web(),
        vec!["orders".into()],
        t,
        Duration::from_secs(300),
        Some(region("eu-west")),
    );
    let token = key.sign(&c).unwrap();

    for bundle in [&doc_path, &jwks_path] {
        let b = bundle.to_str().unwrap();
        let (ok, out, err) = run_cli(
            &[
                "jwt",
                "validate",
                "--bundle",
                b,
                "--audience",
                "orders",
                &token,
            ],
            None,
        );
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["sub"], web().to_string());
        assert_eq!(v["region"], "eu-west");
        assert_eq!(v["kid"], key.kid());
        assert_eq!(v["claims"]["aud"], "orders");
        // From standard input, with the trust domain pinned.
        let (ok, out, err) = run_cli(
            &[
                "jwt",
                "validate",
                "--bundle",
                b,
                "--audience",
                "orders",
                "--trust-domain",
                "example.org",
            ],
            Some(&format!("{token}\n")),
        );
        assert!(ok, "{err}");
        assert!(out.contains("\"eu-west\""));
    }
    let b = doc_path.to_str().unwrap();
    let (ok, out, err) = run_cli(
        &[
            "jwt",
            "validate",
            "--bundle",
            b,
            "--audience",
            "billing",
            &token,
        ],
        None,
    );
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("error: JWT claims: aud [\"orders\"] does not contain \"billing\""),
        "{err}"
    );
    // Pinned to another trust domain, the token's sub has no bundle.
    let (ok, _, err) = run_cli(
        &[
            "jwt",
            "validate",
            "--bundle",
            b,
            "--audience",
            "orders",
            "--trust-domain",
            "other.org",
            &token,
        ],
        None,
    );
    assert!(!ok);
    assert!(
        err.contains("no JWT bundle for trust domain \"example.org\""),
        "{err}"
    );
    let (ok, _, err) = run_cli(
        &[
            "jwt",
            "validate",
            "--bundle",
            b,
            "--audience",
            "orders",
            "x.y",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("three parts"), "{err}");
}

// ---- py-spiffe ----

/// py-spiffe (PyPI `spiffe`, with pyjwt) validates a token we sign with a JWKS we write, and
/// reads our whole SPIFFE bundle document (x509-svid and jwt-svid keys) as a JWT bundle.
#[test]
#[ignore = "needs py-spiffe (TL_PYSPIFFE=/path/to/python)"]
fn py_spiffe_validates_our_tokens_and_reads_our_bundle_document() {
    let python = std::env::var("TL_PYSPIFFE")
        .expect("TL_PYSPIFFE must name a python with the spiffe package installed");
    let pki = common::Pki::new("example.org");
    let key = SigningKey::generate().unwrap();
    let public = key.public(Some(region("eu-west")));
    let mut jb = JwtBundle::new(td());
    jb.insert(public.clone()).unwrap();
    let (rsa_jwk, _) = rsa_token("RS256");
    jb.insert(PublicKey::from_jwk(&rsa_jwk).unwrap()).unwrap();
    let doc = spiffe_bundle_json(
        &pki.roots(),
        &jb.keys().cloned().collect::<Vec<_>>(),
        5,
        300,
    );
    #[allow(clippy::disallowed_methods)]
    let t = SystemTime::now();
    let c = Claims::new(
        web(),
        vec!["orders".into(), "billing".into()],
        t,
        Duration::from_secs(300),
        Some(region("eu-west")),
    );
    let token = key.sign(&c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jb.to_jwks().to_string()).unwrap();
    std::fs::write(dir.path().join("doc.json"), doc.to_string()).unwrap();
    std::fs::write(dir.path().join("token"), &token).unwrap();
    let script = r#"
import json, sys
from spiffe import JwtBundle, JwtSvid, TrustDomain
d = sys.argv[1]
td = TrustDomain("example.org")
token = open(d + "/token").read()
jwks = JwtBundle.parse(td, open(d + "/jwks.json", "rb").read())
svid = JwtSvid.parse_and_validate(token, jwks, {"orders"})
assert str(svid.spiffe_id) == "spiffe://example.org/ns/shop/sa/web", svid.spiffe_id
doc = JwtBundle.parse(td, open(d + "/doc.json", "rb").read())
svid2 = JwtSvid.parse_and_validate(token, doc, {"billing"})
print(json.dumps({"sub": str(svid.spiffe_id), "doc_keys": sorted(doc.jwt_authorities.keys()),
                  "jwks_keys": sorted(jwks.jwt_authorities.keys()), "expiry": svid2.expiry}))
"#;
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe refused: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["expiry"], c.exp);
    let jwks_keys: Vec<&str> = v["jwks_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(
        jwks_keys.contains(&key.kid()) && jwks_keys.contains(&"rsa-1"),
        "{v}"
    );
    // The document's keys: the roots' (by thumbprint) and both JWT keys.
    let doc_keys = v["doc_keys"].as_array().unwrap();
    assert_eq!(doc_keys.len(), doc["keys"].as_array().unwrap().len(), "{v}");
}

#[test]
fn a_jwt_bundle_holds_at_most_max_bundle_keys() {
    let mut b = JwtBundle::new(td());
    for _ in 0..MAX_BUNDLE_KEYS {
        b.insert(SigningKey::generate().unwrap().public(None))
            .unwrap();
    }
    let e = b
        .insert(SigningKey::generate().unwrap().public(None))
        .unwrap_err();
    assert!(e.to_string().contains("more than 4096 JWT keys"), "{e}");
}
